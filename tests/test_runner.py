"""The two routes to timm's own scripts (`--device-modules` and the runner), run with stand-ins shaped like timm's.

timm's train.py / validate.py are not in the timm wheel, so `tests/scripts/` holds stand-ins that reproduce the
parts that matter: train.py's `--device-modules` (and YAML `device_modules:`) import before `create_model`, and
validate.py's plain `create_model(args.model)` with no plugin hook at all.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / 'scripts'
TRAIN_LIKE = SCRIPTS / 'timm_train_like.py'
VALIDATE_LIKE = SCRIPTS / 'timm_validate_like.py'


def _run(args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep))
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def _json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith('{')][-1])


def test_validate_like_needs_the_runner(tmp_path):
    # Without the plugin, timm's registry does not know our models: the failure the runner exists for.
    plain = _run([VALIDATE_LIKE, '--model', 'cifar_resnet20_kcla'])
    assert plain.returncode != 0 and 'Unknown model' in plain.stderr

    res = _run(['-m', 'timm_layerattn.run', VALIDATE_LIKE, '--model', 'cifar_resnet20_kcla', '--num-classes', '7'],
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = _json_line(res.stdout)
    assert out['logits'] == [2, 7]
    assert out['name'] == '__main__' and out['argv0'] == VALIDATE_LIKE.name
    assert out['sibling'] == 'sibling-ok'


def test_runner_exit_code(tmp_path):
    res = _run(['-m', 'timm_layerattn.run', VALIDATE_LIKE, '--model', 'cifar_resnet20', '--exit-code', '3'],
               cwd=tmp_path)
    assert res.returncode == 3, res.stderr
    assert _json_line(res.stdout)['logits'] == [2, 10]


def test_runner_bad_script(tmp_path):
    from timm_layerattn.run import main
    assert main([str(tmp_path / 'missing.py')]) == 2
    not_py = tmp_path / 'train.txt'
    not_py.write_text('print(1)')
    assert main([str(not_py)]) == 2
    assert main([]) == 2


def test_train_like_device_modules_flag():
    res = _run([TRAIN_LIKE, '--model', 'cifar_resnet20_mrlal', '--device-modules', 'timm_layerattn',
                '--num-classes', '5'])
    assert res.returncode == 0, res.stderr
    out = _json_line(res.stdout)
    assert out['input_size'] == [3, 32, 32] and out['num_classes'] == 5
    assert out['loss'] == pytest.approx(out['loss']) and out['loss'] > 0  # finite

    missing = _run([TRAIN_LIKE, '--model', 'cifar_resnet20_mrlal'])
    assert missing.returncode != 0 and 'Unknown model' in missing.stderr


def test_train_like_yaml_device_modules(tmp_path):
    cfg = tmp_path / 'exp.yaml'
    cfg.write_text('model: cifar_resnet20_kcla\ndevice_modules:\n  - timm_layerattn\nnum_classes: 3\n')
    res = _run([TRAIN_LIKE, '-c', cfg])
    assert res.returncode == 0, res.stderr
    assert _json_line(res.stdout)['model'] == 'cifar_resnet20_kcla'
