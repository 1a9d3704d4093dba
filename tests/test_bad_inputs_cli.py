"""Catalogue of bad command-line inputs: each one exits with a one-line error (status 2), never a traceback,
never loses a file; real bugs exit 1 and show their traceback with --debug only.

Runs `timm_layerattn.cli.main` in-process (fast); signals need real processes (subprocess).
"""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.cli import main

NAME = 'cifar_resnet20'


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """A workspace of inputs: weights (good, NaN, a list), a regular file, a user's folder, an export."""
    d = tmp_path_factory.mktemp('bad_inputs')
    sd = timm.create_model(NAME).state_dict()
    safetensors.torch.save_file(sd, str(d / 'w.safetensors'))
    nan = dict(sd, **{'fc.weight': sd['fc.weight'].clone().fill_(float('nan'))})
    safetensors.torch.save_file(nan, str(d / 'nan.safetensors'))
    torch.save([1, 2], d / 'list.pth')
    (d / 'afile').write_text('keep me')
    (d / 'mine').mkdir()
    (d / 'mine' / 'notes.txt').write_text('keep me')
    (d / 'dir.safetensors').mkdir()
    assert main(['export', NAME, '--checkpoint', str(d / 'w.safetensors'), '--out', str(d / 'exported')]) == 0
    return d


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _check(rc, err, status, fragment):
    assert 'Traceback' not in err, err
    assert rc == status, err
    assert fragment in err, err


# (id, argv with {ws} for the workspace, fragment of the error line). All exit with status 2.
TRAIN = ['train', '--model', NAME, '--dataset', 'digits', '--train-samples', '64', '--val-samples', '32', '-b', '32',
         '--epochs', '1', '--no-progress', '--quiet', '--workers', '0']
PARSE_CASES = [
    ('train-lr-nan', [*TRAIN, '--lr', 'nan'], "argument --lr: must be a finite number > 0, got 'nan'"),
    ('train-lr-negative', [*TRAIN, '--lr', '-0.1'], 'argument --lr: must be a finite number > 0'),
    ('train-lr-text', [*TRAIN, '--lr', 'fast'], "argument --lr: must be a finite number > 0, got 'fast'"),
    ('train-num-classes-0', [*TRAIN, '--num-classes', '0'], 'argument --num-classes: must be an integer >= 1'),
    ('train-epochs-0', [*TRAIN, '--epochs', '0'], 'argument --epochs: must be an integer >= 1'),
    ('train-batch-0', [*TRAIN, '-b', '0'], 'argument --batch-size/-b: must be an integer >= 1'),
    ('train-workers-negative', [*TRAIN, '--workers', '-1'], 'argument --workers/-j: must be an integer >= 0'),
    ('train-wd-negative', [*TRAIN, '--weight-decay', '-1'], 'argument --weight-decay/--wd: must be a finite number'),
    ('train-wd-inf', [*TRAIN, '--weight-decay', 'inf'], "got 'inf'"),
    ('train-drop-path', [*TRAIN, '--drop-path', '1.5'], 'argument --drop-path: must be a finite number in [0, 1)'),
    ('train-momentum', [*TRAIN, '--momentum', '1.5'], 'argument --momentum'),
    ('train-hflip', [*TRAIN, '--hflip', '2'], 'argument --hflip: must be a finite number in [0, 1]'),
    ('train-seed', [*TRAIN, '--seed', '-1'], 'argument --seed'),
    ('train-iters-0', [*TRAIN, '--iters', '0'], 'argument --iters'),
    ('train-train-samples-0', [*TRAIN, '--train-samples', '0'], 'argument --train-samples'),
    ('train-input-size-0', [*TRAIN, '--input-size', '3', '0', '32'], 'argument --input-size'),
    ('train-crop-pct', [*TRAIN, '--crop-pct', '0'], 'argument --crop-pct'),
    ('train-model-kwargs', [*TRAIN, '--model-kwargs', 'head_dim'], 'argument --model-kwargs: expected KEY=VALUE'),
    ('train-clip-mode', [*TRAIN, '--clip-mode', 'banana'], 'argument --clip-mode: invalid choice'),
    ('train-interpolation', [*TRAIN, '--interpolation', 'banana'], 'argument --interpolation: invalid choice'),
    ('demo-epochs-0', ['demo', '--epochs', '0'], 'argument --epochs: must be an integer >= 1'),
    ('demo-lr-nan', ['demo', '--lr', 'nan'], 'argument --lr'),
    ('bench-batch-0', ['bench', '--batch-size', '0'], 'argument --batch-size'),
    ('bench-threads', ['bench', '--threads', '-2'], 'argument --threads'),
    ('bench-img-size', ['bench', '--img-size', '0'], 'argument --img-size'),
    ('list-num-classes', ['list', '--num-classes', '-1'], 'argument --num-classes'),
    ('export-num-classes-0', ['export', NAME, '--checkpoint', 'x', '--out', 'y', '--num-classes', '0'],
     'argument --num-classes'),
    ('export-in-chans-0', ['export', NAME, '--checkpoint', 'x', '--out', 'y', '--in-chans', '0'],
     'argument --in-chans'),
    ('convert-head-dim-0', ['convert', '--model', 'cifar_resnet20_kcla', 'x', 'y.safetensors', '--head-dim', '0'],
     'argument --head-dim'),
    ('unknown-command', ['nosuch'], "invalid choice: 'nosuch'"),
]


@pytest.mark.parametrize('argv,fragment', [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_refused_at_parse_time(argv, fragment, capsys):
    rc, _, err = _cli(capsys, *argv)
    _check(rc, err, 2, fragment)
    assert err.strip().splitlines()[-1].startswith('timm-layerattn'), err


EXPORT = ['export', NAME, '--checkpoint', '{ws}/w.safetensors', '--out']
RUN_CASES = [
    # export: unwritable or occupied outputs, bad checkpoints, bad model arguments
    ('export-out-under-file', [*EXPORT, '{ws}/afile/x'], 'afile is not a folder'),
    ('export-overwrite-file', [*EXPORT, '{ws}/afile', '--overwrite'],
     'exists and is not a folder; it is never replaced'),
    ('export-overwrite-user-folder', [*EXPORT, '{ws}/mine', '--overwrite'], 'is not an export folder'),
    ('export-exists', [*EXPORT, '{ws}/exported'], 'already exists'),
    ('export-out-proc', [*EXPORT, '/proc/timm-layerattn-test'], 'cannot be created'),
    ('export-nan-weights', ['export', NAME, '--checkpoint', '{ws}/nan.safetensors', '--out', '{ws}/o'],
     'holds non-finite values (NaN or inf) in 1 tensor(s): fc.weight'),
    ('export-list-checkpoint', ['export', NAME, '--checkpoint', '{ws}/list.pth', '--out', '{ws}/o'], 'holds a list'),
    ('export-checkpoint-folder', ['export', NAME, '--checkpoint', '{ws}/mine', '--out', '{ws}/o'], 'not a file'),
    ('export-checkpoint-missing', ['export', NAME, '--checkpoint', '{ws}/nope.pth', '--out', '{ws}/o'], 'not found'),
    ('export-unknown-model', ['export', 'nosuch', '--checkpoint', '{ws}/w.safetensors', '--out', '{ws}/o'],
     "unknown model 'nosuch'"),
    ('export-bad-model-kwarg', [*EXPORT, '{ws}/o', '--model-kwargs', 'head_dim=0'], 'cannot build cifar_resnet20'),
    # convert
    ('convert-out-under-file', ['convert', '--model', NAME, '{ws}/w.safetensors', '{ws}/afile/x.safetensors'],
     'is not a folder'),
    ('convert-out-folder', ['convert', '--model', NAME, '{ws}/w.safetensors', '{ws}/dir.safetensors', '--overwrite'],
     'is a folder'),
    ('convert-out-exists', ['convert', '--model', NAME, '{ws}/w.safetensors', '{ws}/w.safetensors'], 'already exists'),
    ('convert-out-proc', ['convert', '--model', NAME, '{ws}/w.safetensors', '/proc/x.safetensors'], 'not writable'),
    ('convert-nan', ['convert', '--model', NAME, '{ws}/nan.safetensors', '{ws}/n.safetensors'], 'non-finite'),
    ('convert-missing', ['convert', '--model', NAME, '{ws}/nope.pth', '{ws}/n.safetensors'], 'not found'),
    # train: all refused before the first step
    ('train-output-under-file', [*TRAIN, '--output', '{ws}/afile/x'], 'cannot be created'),
    ('train-export-file', [*TRAIN, '--output', '{ws}/r', '--export', '{ws}/afile'], 'exists and is not a folder'),
    ('train-export-user-folder', [*TRAIN, '--output', '{ws}/r', '--export', '{ws}/mine', '--overwrite'],
     'export folder {ws}/mine is not an export folder'),
    ('train-initial-nan', [*TRAIN, '--output', '{ws}/r', '--initial-checkpoint', '{ws}/nan.safetensors'],
     'non-finite values'),
    ('train-initial-list', [*TRAIN, '--output', '{ws}/r', '--initial-checkpoint', '{ws}/list.pth'], 'holds a list'),
    ('train-bad-model-kwarg', [*TRAIN, '--output', '{ws}/r', '--model-kwargs', 'head_dim=0'],
     'cannot create cifar_resnet20'),
    ('train-unknown-model', [*TRAIN, '--output', '{ws}/r', '--model', 'nosuch'], "unknown model 'nosuch'"),
    ('train-local-dir-missing', [*TRAIN, '--output', '{ws}/r', '--model', 'local-dir:{ws}/nope'], 'not found'),
    ('train-opt', [*TRAIN, '--output', '{ws}/r', '--opt', 'nonsense'], '--opt nonsense'),
    ('train-aa', [*TRAIN, '--output', '{ws}/r', '--aa', 'banana', '--train-aug', 'timm'], "--aa 'banana'"),
    ('train-input-channels', [*TRAIN, '--output', '{ws}/r', '--input-size', '1', '32', '32'], '1 channel(s)'),
    ('train-mean-length', [*TRAIN, '--output', '{ws}/r', '--mean', '0.5', '0.5'], '--mean takes 1 or 3 values'),
    ('train-device', [*TRAIN, '--output', '{ws}/r', '--device', 'banana'], 'cannot set up device banana'),
    ('train-in-chans', [*TRAIN, '--output', '{ws}/r', '--model-kwargs', 'in_chans=1'], 'takes 1 input channel(s)'),
    ('train-recipe', [*TRAIN, '--output', '{ws}/r', '--recipe', 'nope'], "unknown recipe 'nope'"),
    # flags the run would ignore without a word (issue 21)
    ('train-iters-and-epochs', [*TRAIN, '--output', '{ws}/r', '--iters', '3', '--epochs', '10'],
     'give --iters or --epochs, not both'),
    ('train-digits-data-dir', [*TRAIN, '--output', '{ws}/r', '{ws}/mine'],
     'is embedded and reads no folder: drop DATA_DIR'),
    ('train-pad-without-cifar-aug', [*TRAIN, '--output', '{ws}/r', '--pad', '2', '--train-aug', 'none'],
     '--pad is the padding of the cifar crop: it has no effect with --train-aug none'),
    ('train-milestones-cosine', [*TRAIN, '--output', '{ws}/r', '--decay-milestones', '5', '--sched', 'cosine'],
     '--decay-milestones applies to --sched multistep only, not --sched cosine'),
    ('train-resume-list', [*TRAIN, '--output', '{ws}/r', '--resume', '{ws}/list.pth'], 'not a training checkpoint'),
    # demo, det-configs, bench, push, list
    ('demo-user-folder', ['demo', '--output', '{ws}/mine', '--overwrite', '--no-bench'], 'not a demo output folder'),
    ('demo-output-under-file', ['demo', '--output', '{ws}/afile/x', '--no-bench'], 'cannot be created'),
    ('det-configs-copy-file', ['det-configs', '--copy', '{ws}/afile', '--overwrite'], 'exists and is not a folder'),
    ('det-configs-copy-user-folder', ['det-configs', '--copy', '{ws}/mine', '--overwrite'], 'is not a copy of'),
    ('det-configs-pattern', ['det-configs', 'no-such-*'], 'no config matches'),
    ('bench-plot-folder', ['bench', '--models', NAME, '--baseline', NAME, '--plot', '{ws}/mine'], 'is a folder'),
    ('bench-plot-not-png', ['bench', '--models', NAME, '--baseline', NAME, '--plot', '{ws}/afile'], 'is not a PNG'),
    ('bench-device', ['bench', '--models', NAME, '--baseline', NAME, '--device', 'banana'], "--device 'banana'"),
    ('bench-no-models', ['bench', '--models', ','], 'names no model'),
    ('bench-unknown-model', ['bench', '--models', 'nosuch'], "unknown model 'nosuch'"),
    ('push-missing-folder', ['push', '{ws}/nope', '--repo-id', 'acme/x', '--dry-run'], 'not a folder'),
    ('push-user-folder', ['push', '{ws}/mine', '--repo-id', 'acme/x', '--dry-run'], 'is missing config.json'),
    ('list-no-match', ['list', 'nomatch*'], 'no registered model matches'),
]


@pytest.mark.parametrize('argv,fragment', [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_refused_with_one_line(ws, argv, fragment, capsys):
    before = {p.name: (p.stat().st_mtime_ns, p.is_dir()) for p in ws.iterdir()}
    rc, _, err = _cli(capsys, *[a.replace('{ws}', str(ws)) for a in argv])
    _check(rc, err, 2, fragment.replace('{ws}', str(ws)))
    lines = [line for line in err.strip().splitlines() if line.startswith('timm-layerattn')]
    assert len(lines) == 1, err
    # nothing was created, replaced or left behind
    assert {p.name: (p.stat().st_mtime_ns, p.is_dir()) for p in ws.iterdir()} == before
    assert (ws / 'afile').read_text() == 'keep me' and (ws / 'mine' / 'notes.txt').read_text() == 'keep me'


def test_nan_loss_is_a_user_error(tmp_path, capsys):
    rc, _, err = _cli(capsys, *TRAIN, '--lr', '1e30', '--output', tmp_path / 'r')
    _check(rc, err, 2, 'loss is')
    assert 'lower --lr' in err


def test_module_entry_reports_like_the_cli(ws, capsys):
    """`python -m timm_layerattn.train` (what torchrun runs) uses the same handler."""
    from timm_layerattn.train import main as train_main
    rc = train_main([*TRAIN[1:], '--output', str(ws / 'r'), '--model-kwargs', 'head_dim=0'])
    err = capsys.readouterr().err
    _check(rc, err, 2, 'timm-layerattn train: error: cannot create cifar_resnet20')
    assert not (ws / 'r').exists()


def test_push_without_token(ws, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    monkeypatch.setenv('HF_TOKEN_PATH', str(tmp_path / 'token'))
    rc, _, err = _cli(capsys, 'push', ws / 'exported', '--repo-id', 'acme/x')
    _check(rc, err, 2, 'no Hugging Face token found')


# ---------------------------------------------------------------------------------------------------------------
# --overwrite replaces our own outputs (and empty folders), nothing else
# ---------------------------------------------------------------------------------------------------------------

def test_overwrite_replaces_our_export_and_empty_folders(ws, tmp_path, capsys):
    out = tmp_path / 'exp'
    args = ['export', NAME, '--checkpoint', ws / 'w.safetensors', '--out', out]
    assert _cli(capsys, *args)[0] == 0
    rc, _, err = _cli(capsys, *args, '--overwrite', '--tag', 'again')
    assert rc == 0, err
    assert '"tag": "again"' in (out / 'config.json').read_text()
    (out / 'notes.txt').write_text('mine')  # a file of the user's in it: no longer replaceable
    rc, _, err = _cli(capsys, *args, '--overwrite')
    _check(rc, err, 2, 'is not an export folder')
    assert (out / 'notes.txt').read_text() == 'mine'
    empty = tmp_path / 'empty'
    empty.mkdir()
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', ws / 'w.safetensors', '--out', empty, '--overwrite')
    assert rc == 0, err and (empty / 'model.safetensors').is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')], 'temporary folders left behind'


def test_overwrite_replaces_an_earlier_config_copy(tmp_path, capsys):
    dest = tmp_path / 'cfgs'
    assert _cli(capsys, 'det-configs', '--copy', dest)[0] == 0
    rc, _, err = _cli(capsys, 'det-configs', '--copy', dest, '--overwrite')
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------
# Real bugs: one line and status 1, the traceback with --debug
# ---------------------------------------------------------------------------------------------------------------

def test_unexpected_errors_are_bugs(monkeypatch, capsys):
    from timm_layerattn.tools import zoo

    def broken(args):
        raise TypeError('something inside is broken')

    monkeypatch.setattr(zoo, 'run', broken)
    rc, _, err = _cli(capsys, 'list')
    assert rc == 1 and 'Traceback' not in err
    assert err.strip().splitlines() == [
        'timm-layerattn list: internal error: TypeError: something inside is broken (a bug, not your input; run '
        'with --debug for the traceback)']
    for argv in (['--debug', 'list'], ['list', '--debug']):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and 'Traceback' in err and 'raise TypeError' in err, argv


def test_user_errors_show_a_traceback_with_debug_only(ws, capsys):
    rc, _, err = _cli(capsys, '--debug', 'list', 'nomatch*')
    assert rc == 2 and 'Traceback' in err and err.strip().splitlines()[-1].startswith('timm-layerattn list: error:')


# ---------------------------------------------------------------------------------------------------------------
# Signals: SIGTERM / SIGINT clean up; kill -9 leaves a temporary folder that the next run removes
# ---------------------------------------------------------------------------------------------------------------

# An export through the command line that pauses inside its temporary folder (while verifying) until killed.
_PAUSED_EXPORT = textwrap.dedent('''
    import signal, sys, time
    import timm_layerattn.hub as hub
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner ignores SIGINT
    from timm_layerattn.cli import main

    def paused(model, folder):
        print('ready', folder, flush=True)
        time.sleep(120)

    hub._verify_export = paused
    sys.exit(main(['export', 'cifar_resnet20', '--checkpoint', sys.argv[1], '--out', sys.argv[2]]))
''')


def _start_paused_export(ws: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.Popen([sys.executable, '-c', _PAUSED_EXPORT, str(ws / 'w.safetensors'), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_ready(proc: subprocess.Popen) -> Path:
    for line in proc.stdout:  # the command's own output comes first
        if line.startswith('ready'):
            return Path(line.split(maxsplit=1)[1].strip())
    raise AssertionError(f'the export ended early: {proc.wait()}, {proc.stderr.read()}')


def _siblings(out: Path):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.'))


@pytest.mark.timeout(240)
def test_signals_clean_up_and_stale_temporaries_are_removed(ws, tmp_path, capsys, caplog):
    outs = {s: tmp_path / s.name for s in (signal.SIGTERM, signal.SIGKILL)}
    procs = {s: _start_paused_export(ws, out) for s, out in outs.items()}  # in parallel: start-up dominates
    try:
        tmps = {s: _wait_ready(p) for s, p in procs.items()}
        for s, p in procs.items():
            assert tmps[s].is_dir() and tmps[s].parent == tmp_path and str(p.pid) in tmps[s].name
            p.send_signal(s)
        codes = {s: p.wait(timeout=60) for s, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    errs = {s: p.stderr.read() for s, p in procs.items()}
    # SIGTERM: the cleanup ran, nothing is left, and the status says why
    assert codes[signal.SIGTERM] == 128 + signal.SIGTERM, errs[signal.SIGTERM]
    assert 'terminated by SIGTERM' in errs[signal.SIGTERM] and 'Traceback' not in errs[signal.SIGTERM]
    assert not outs[signal.SIGTERM].exists() and not _siblings(outs[signal.SIGTERM])
    # SIGKILL: no chance to clean up; the next run removes the dead run's folder and says so
    out = outs[signal.SIGKILL]
    assert codes[signal.SIGKILL] == -signal.SIGKILL and _siblings(out) == [tmps[signal.SIGKILL].name]
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', ws / 'w.safetensors', '--out', out)
    assert rc == 0, err
    assert any(f'removed {tmps[signal.SIGKILL]}' in r.getMessage() and 'interrupted run' in r.getMessage()
               for r in caplog.records), caplog.text
    assert _siblings(out) == [] and (out / 'model.safetensors').is_file()
    # the handlers of the calling process are back as they were
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigint_cleans_up(tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt from Python's own SIGINT handler) inside an atomic folder or file."""
    from timm_layerattn._utils.files import atomic_dir, atomic_file
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started as a background job of a non-interactive shell
        monkeypatch.setattr(signal, 'raise_signal', lambda sig: signal.default_int_handler(sig, None))
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(tmp_path / 'out') as d:
            (d / 'f').write_text('x')
            signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / 'f.bin') as f:
            f.write(b'x')
            signal.raise_signal(signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_in_process_cleans_up_and_restores_the_handler(tmp_path):
    from timm_layerattn._utils.errors import Terminated
    from timm_layerattn._utils.files import atomic_dir
    before = signal.getsignal(signal.SIGTERM)
    if before is not signal.SIG_DFL:
        pytest.skip('SIGTERM has a handler in this test process')
    with pytest.raises(Terminated) as e:
        with atomic_dir(tmp_path / 'out') as d:
            (d / 'f').write_text('x')
            signal.raise_signal(signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_temporaries_of_live_processes_are_kept(tmp_path):
    from timm_layerattn._utils.files import _HOST, atomic_dir
    live = tmp_path / f'.out.{os.getppid()}-{_HOST}-abcd1234.tmp'  # our parent is alive
    other_host = tmp_path / '.out.999999-000000-abcd1234.tmp'
    live.mkdir(), other_host.mkdir()
    with atomic_dir(tmp_path / 'out') as d:
        (d / 'f').write_text('x')
    assert live.is_dir() and other_host.is_dir() and (tmp_path / 'out' / 'f').is_file()


def test_atomic_dir_restores_an_interrupted_swap(tmp_path):
    """Killed between moving the old folder aside and moving the new one in: the next run puts it back."""
    from timm_layerattn._utils.files import _HOST, atomic_dir
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()  # a pid that is certainly dead
    aside = tmp_path / f'.out.{proc.pid}-{_HOST}-swap.old'
    aside.mkdir()
    (aside / 'f').write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / 'other'):
            raise RuntimeError('unrelated destination: leaves .out.* alone')
    assert aside.is_dir()
    with atomic_dir(tmp_path / 'out', overwrite=True, is_ours=lambda p: (p / 'f').read_text() == 'old') as d:
        assert (tmp_path / 'out' / 'f').read_text() == 'old'  # restored before anything else
        (d / 'f').write_text('new')
    assert (tmp_path / 'out' / 'f').read_text() == 'new'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']


# ---------------------------------------------------------------------------------------------------------------
# Issue 21: full disks, long names, paths that exist but are not files
# ---------------------------------------------------------------------------------------------------------------

def _no_temporaries(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith('.') or p.name.startswith('tmp')]
    assert not left, left


def test_full_disk_is_an_os_error_line(ws, tmp_path, monkeypatch, capsys):
    import errno
    import timm.models
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    with monkeypatch.context() as m:  # export: safetensors hides the OS error in its own exception
        m.setattr(timm.models, 'save_for_hf', full)
        rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', ws / 'w.safetensors', '--out', tmp_path / 'exp')
    _check(rc, err, 2, f'error: No space left on device: {tmp_path / "exp"}')
    assert 'a bug' not in err and err.count('\n') == 1 and not (tmp_path / 'exp').exists()

    def fsync_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:  # convert: a plain OSError without a file name gets the output's
        m.setattr(os, 'fsync', fsync_full)
        rc, _, err = _cli(capsys, 'convert', '--model', NAME, ws / 'w.safetensors', tmp_path / 'c.safetensors')
    _check(rc, err, 2, f'No space left on device: {tmp_path / "c.safetensors"}')
    _no_temporaries(tmp_path)


def test_torch_writer_failure_is_an_os_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError('... inline_container.cc ...'): an OSError for the file."""
    from timm_layerattn._utils import files
    monkeypatch.setattr(files.shutil, 'disk_usage', lambda p: type('U', (), {'free': 1024})())
    with pytest.raises(OSError) as info:
        with files.atomic_file(tmp_path / 'x.pth') as f:
            f.write(b'part')
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    assert info.value.strerror == os.strerror(28) and info.value.filename == str(tmp_path / 'x.pth')
    assert list(tmp_path.iterdir()) == []


def test_long_output_names(ws, tmp_path, capsys):
    """Any legal name (up to 255 bytes) works: the temporary sibling's name is shortened, not the output's."""
    name = 'b' * 240
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', ws / 'w.safetensors', '--out', tmp_path / name)
    assert rc == 0, err
    assert (tmp_path / name / 'model.safetensors').is_file()
    out = tmp_path / ('c' * 240 + '.safetensors')  # 252 bytes
    rc, _, err = _cli(capsys, 'convert', '--model', NAME, ws / 'w.safetensors', out)
    assert rc == 0 and out.is_file(), err
    _no_temporaries(tmp_path)


@pytest.mark.skipif(os.name != 'posix', reason='FIFOs and symbolic links')
def test_not_found_only_when_missing(ws, tmp_path, capsys):
    (tmp_path / 'run').mkdir()
    os.mkfifo(tmp_path / 'fifo')
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')
    cases = [('run', 'is a folder, not a file'), ('fifo', 'is a FIFO (named pipe), not a file'),
             ('loop', 'is a symbolic link loop'), ('dangling', 'is a symbolic link to a missing target'),
             ('missing', 'not found')]
    for name, words in cases:
        rc, _, err = _cli(capsys, *TRAIN, '--resume', tmp_path / name, '--output', tmp_path / 'out')
        _check(rc, err, 2, words)
        assert name == 'missing' or 'not found' not in err, err
        rc, _, err = _cli(capsys, 'convert', '--model', NAME, tmp_path / name, tmp_path / 'c.safetensors')
        _check(rc, err, 2, words)
        rc, _, err = _cli(capsys, *TRAIN, '--initial-checkpoint', tmp_path / name, '--output', tmp_path / 'out')
        _check(rc, err, 2, words)
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 21: trainer faults
# ---------------------------------------------------------------------------------------------------------------

def test_train_failed_save_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, 'fsync', full)  # every atomic write of the run (checkpoints, log.json) fails
    rc, _, err = _cli(capsys, *TRAIN, '--output', tmp_path / 'r')
    _check(rc, err, 2, f'error: No space left on device: {tmp_path / "r"}')
    assert 'a bug' not in err and len([ln for ln in err.splitlines() if ln.startswith('timm-layerattn')]) == 1
    left = [p.name for p in (tmp_path / 'r').iterdir()] if (tmp_path / 'r').exists() else []
    assert not [n for n in left if n.startswith('.') or n.startswith('tmp')], left


def test_train_resume_with_another_optimizer_or_schedule(tmp_path, capsys):
    out = tmp_path / 'r'
    rc, _, err = _cli(capsys, *TRAIN, '--output', out, '--opt', 'adamw', '--lr', '1e-3')
    assert rc == 0, err
    # another optimizer (the default, momentum SGD) and schedule: what fits is restored, the rest reset, one line
    rc, out_text, err = _cli(capsys, *[a for a in TRAIN if a != '--quiet'], '--epochs', '2', '--sched', 'multistep',
                             '--resume', out / 'last.pth.tar')
    assert rc == 0, err
    notes = [ln for ln in out_text.splitlines() if ln.startswith('note: --resume')]
    assert len(notes) == 1, out_text
    assert ("reset the optimizer state (the checkpoint's run used --opt adamw, this one --opt momentum)" in notes[0]
            and 'the lr schedule (--sched multistep from the resumed epoch on' in notes[0]), notes
    assert 'resumed from epoch 0' in out_text
    # the same optimizer: restored silently
    rc, out_text, err = _cli(capsys, *[a for a in TRAIN if a != '--quiet'], '--epochs', '3', '--sched', 'multistep',
                             '--resume', out / 'last.pth.tar')
    assert rc == 0 and 'note: --resume' not in out_text, out_text + err


def test_train_one_class_is_refused(tmp_path, capsys):
    from PIL import Image
    for split in ('train', 'validation'):
        (tmp_path / 'data' / split / 'cat').mkdir(parents=True)
        for i in range(4):
            Image.new('RGB', (32, 32), (i * 40, 0, 0)).save(tmp_path / 'data' / split / 'cat' / f'{i}.png')
    rc, _, err = _cli(capsys, 'train', tmp_path / 'data', '--model', NAME, '--dataset', '', '--epochs', '1',
                      '--no-progress', '--quiet', '--workers', '0', '-b', '2', '--output', tmp_path / 'r')
    _check(rc, err, 2, 'the training data holds 1 class (cat); a classifier needs at least 2')
    assert not (tmp_path / 'r').exists()
