"""`timm-layerattn demo` end to end on a small slice of the embedded digits (the full run is `make demo`)."""
import importlib.util
import json

import pytest

from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main

pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

QUICK = ['--epochs', '2', '--train-samples', '96', '--val-samples', '40', '--no-bench', '--no-progress']


def test_demo_trains_exports_reloads(tmp_path, capsys):
    out = tmp_path / 'demo'
    rc = main(['demo', '--models', 'cifar_resnet20', 'cifar_resnet20_kcla', '--export-model', 'cifar_resnet20_kcla',
               '--output', str(out), *QUICK])
    text = capsys.readouterr().out
    assert rc == 0, text
    # Model table before training, results table after.
    assert text.index('GMACs') < text.index('== [1/2] cifar_resnet20 ==') < text.index('best val acc')
    summary = json.loads((out / 'demo.json').read_text())
    assert [r['model'] for r in summary['results']] == ['cifar_resnet20', 'cifar_resnet20_kcla']
    assert all(len(r['history']) == 2 for r in summary['results'])
    reload = summary['reload']
    assert summary['exported'] == 'cifar_resnet20_kcla'
    assert reload['identical'] and reload['reloaded_top1'] == reload['trained_top1']
    assert f'after reload: {reload["trained_top1"]:.2f}%' in text
    export = out / 'export' / 'cifar_resnet20_kcla'
    assert {p.name for p in export.iterdir()} == {'config.json', 'model.safetensors', 'README.md'}
    png = (out / 'training_curves.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000
    assert (out / 'runs' / 'cifar_resnet20' / 'summary.csv').is_file()
    assert not list(tmp_path.glob('.demo*'))  # no temporary folder left behind

    # A second run replaces the previous demo folder.
    assert main(['demo', '--models', 'cifar_resnet20', '--output', str(out), '--epochs', '1', '--train-samples', '32',
                 '--val-samples', '16', '--no-bench', '--no-progress']) == 0
    assert json.loads((out / 'demo.json').read_text())['models'] == ['cifar_resnet20']


def test_demo_bad_input(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert main(['demo', '--output', str(blocker / 'out'), *QUICK]) == 2
    assert 'cannot be created' in capsys.readouterr().err
    other = tmp_path / 'mine'
    other.mkdir()
    (other / 'notes.txt').write_text('keep me')
    assert main(['demo', '--output', str(other), *QUICK]) == 2
    assert 'not a demo output folder' in capsys.readouterr().err
    assert (other / 'notes.txt').read_text() == 'keep me'
    assert main(['demo', '--models', 'cifar_resnet21', '--output', str(tmp_path / 'o'), *QUICK]) == 2
    assert 'unknown model' in capsys.readouterr().err
    assert main(['demo', '--dataset', '', str(tmp_path / 'no_such_data'), '--output', str(tmp_path / 'o'), *QUICK]) == 2
    assert 'dataset folder not found' in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_demo_missing_extra_names_the_install_command(monkeypatch):
    from timm_layerattn import data
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'sklearn' else real(name, *a))
    with pytest.raises(UserError, match=r'scikit-learn not installed.*pip install "timm-layerattn\[demo\]"'):
        data.require_demo_extra('sklearn', 'matplotlib')
