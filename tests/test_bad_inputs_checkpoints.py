"""Bad checkpoints through timm's own entry points: every case one clear error naming the file and the problem.

The entry points are `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`,
`timm.create_model('local-dir:...', pretrained=True)` and `timm.create_model('hf-hub:...', pretrained=True)`.
Each case asserts the exception type and fragments of its message (the file and the problem), or that the
model loads with exactly the checkpoint's tensors. Cases marked "timm's own error" fail inside
`timm.create_model` (reading `config.json`) before any code of this package runs; they are recorded so a
change in timm's behaviour shows up here.

Hub cases run in child processes (huggingface_hub reads `HF_ENDPOINT` / `HF_HUB_OFFLINE` at import) against the
loopback Hub of `_hub_server.py`, so the suite stays offline.
"""
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict

import pytest
import safetensors.torch
import timm
import torch
from timm.models import adapt_input_conv

import timm_layerattn  # noqa: F401
from timm_layerattn import export_folder
from timm_layerattn.pretrained import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError)

from _hub_server import FakeHub
from test_hub_export import _trained_like

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = 'cifar_resnet20_kcla'


def _model(name: str = NAME, seed: int = 1, **kwargs) -> torch.nn.Module:
    """A model whose every tensor differs from its init (so a load that silently did nothing shows)."""
    return _trained_like(name, seed, **kwargs)


def _sd(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _mark(path: str) -> str:
    """Would run if a checkpoint holding `_Evil` were fully unpickled."""
    Path(path).write_text('unpickled')
    return path


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _mark, (self.marker,)


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> Dict[str, Any]:
    """Every checkpoint file of the catalogue, written once."""
    d = tmp_path_factory.mktemp('ckpt')
    model = _model()
    sd = _sd(model)
    out: Dict[str, Any] = {'dir': d, 'sd': sd}

    def st(name, tensors):
        safetensors.torch.save_file(tensors, str(d / name))
        return d / name

    def pth(name, obj):
        torch.save(obj, str(d / name))
        return d / name

    good = st('good.safetensors', sd)
    out['good'] = good
    out['good_pth'] = pth('good.pth', sd)
    raw = good.read_bytes()
    (d / 'truncated.safetensors').write_bytes(raw[:len(raw) // 2])
    (d / 'garbage.safetensors').write_bytes(b'not a checkpoint at all\n' * 20)
    (d / 'empty.safetensors').write_bytes(b'')
    (d / 'torch_named.safetensors').write_bytes(out['good_pth'].read_bytes())
    (d / 'st_named.pth').write_bytes(raw)
    raw_pth = out['good_pth'].read_bytes()
    (d / 'truncated.pth').write_bytes(raw_pth[:len(raw_pth) // 2])
    pth('list.pth', [1, 2, 3])
    pth('str.pth', 'weights')
    pth('int.pth', 7)
    pth('nontensor.pth', {'lr': 0.1, 'arch': NAME})
    pth('extra.pth', {**sd, 'epoch': 3})
    out['marker'] = d / 'unpickled.txt'
    pth('pickled.pth', {'state_dict': sd, 'extra': _Evil(str(out['marker']))})
    nan = dict(sd, **{'conv1.weight': sd['conv1.weight'].clone()})
    nan['conv1.weight'][0, 0, 0, 0] = float('nan')
    st('nan.safetensors', nan)
    inf = dict(sd, **{'layer2.0.bn1.running_var': sd['layer2.0.bn1.running_var'].clone()})
    inf['layer2.0.bn1.running_var'][1] = float('inf')
    pth('inf_container.pth', {'state_dict': {'module.' + k: v for k, v in inf.items()}, 'epoch': 5})
    out['nan_sd'] = nan
    st('mrlal.safetensors', _sd(_model('cifar_resnet20_mrlal')))
    st('deeper.safetensors', _sd(_model('cifar_resnet56_kcla')))
    st('plain.safetensors', _sd(_model('cifar_resnet20')))
    st('head_dim8.safetensors', _sd(_model(NAME, head_dim=8)))
    out['c100'] = _model(NAME, num_classes=100)
    st('c100.safetensors', _sd(out['c100']))
    out['grey'] = _model(NAME, in_chans=1)
    st('grey.safetensors', _sd(out['grey']))
    # containers and prefixes written by training scripts
    ema = _model(seed=2)
    out['ema'] = ema
    pth('ema.pth', {'state_dict': sd, 'state_dict_ema': _sd(ema), 'epoch': 3})
    pth('module.pth', {'model': {'module.' + k: v for k, v in sd.items()}})
    # folders
    out['folder'] = export_folder(model, d / 'export', model_name=NAME)
    return out


def _load(file, name: str = NAME, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file), **kwargs.pop(
        'overlay', {})), **kwargs)


def _same(model: torch.nn.Module, sd: Dict[str, torch.Tensor], skip: str = '') -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        if not (skip and k.startswith(skip)):
            assert torch.equal(loaded[k], v), k


def _raises(exc_type, *fragments, fn, **kwargs) -> BaseException:
    with pytest.raises(exc_type) as info:
        fn(**kwargs)
    text = str(info.value)
    assert '\n' not in text, text
    for fragment in fragments:
        assert str(fragment) in text, (fragment, text)
    return info.value


# -----------------------------------------------------------------------------------------------------------
# pretrained_cfg_overlay=dict(file=...)
# -----------------------------------------------------------------------------------------------------------

# (file name, exception type, message fragments); every message must also name the file.
_FILE_CASES = [
    ('missing.safetensors', CheckpointNotFoundError, ['not found']),
    ('empty.safetensors', CheckpointError, ['file is empty']),
    ('truncated.safetensors', CheckpointError, ['truncated or corrupt']),
    ('garbage.safetensors', CheckpointError, ['truncated or corrupt']),
    ('torch_named.safetensors', CheckpointError, ['torch checkpoint', 'rename it to .pth']),
    ('st_named.pth', CheckpointError, ['safetensors file', 'rename it to st_named.safetensors']),
    ('truncated.pth', CheckpointError, ['truncated or corrupt']),
    ('list.pth', CheckpointError, ['holds a list', 'expected a state dict']),
    ('str.pth', CheckpointError, ['holds a str']),
    ('int.pth', CheckpointError, ['holds an int']),
    ('nontensor.pth', CheckpointError, ['holds no tensors', 'lr']),
    ('extra.pth', CheckpointError, ['not a tensor', 'epoch (int)']),
    ('pickled.pth', CheckpointError, ['test_bad_inputs_checkpoints._mark', 'weights_only=True']),
    ('nan.safetensors', CheckpointError, ['NaN', 'conv1.weight (1 NaN)']),
    ('inf_container.pth', CheckpointError, ['Inf', 'layer2.0.bn1.running_var (1 Inf)']),
    ('mrlal.safetensors', CheckpointMismatchError, [
        "does not fit 'cifar_resnet20_kcla'", 'missing key(s): layer1.0.attn.norm_d', 'unexpected key(s)',
        'lambda_t', "holds mrla_light weights", "create 'cifar_resnet20_mrlal'"]),
    ('deeper.safetensors', CheckpointMismatchError, [
        'unexpected key(s)', '6-6-6 blocks per stage', 'with 2-2-2', "create 'cifar_resnet56_kcla'"]),
    ('plain.safetensors', CheckpointMismatchError, [
        'missing key(s)', 'holds plain weights', "create 'cifar_resnet20' instead", 'load_trunk(model, path)']),
    ('head_dim8.safetensors', CheckpointMismatchError, ['shape mismatch', 'head dim is 8', 'head_dim=8']),
    ('c100.safetensors', CheckpointMismatchError, [
        'fc.weight checkpoint [100, 256] vs model [10, 256]', 'classifier has 100 classes', 'num_classes=100']),
    ('grey.safetensors', CheckpointMismatchError, ['conv1', 'input_size=(1, 32, 32)']),
]


@pytest.mark.parametrize('name,exc_type,fragments', _FILE_CASES, ids=[c[0] for c in _FILE_CASES])
def test_bad_file(files, name, exc_type, fragments):
    path = files['dir'] / name
    err = _raises(exc_type, str(path), *fragments, fn=_load, file=path)
    assert isinstance(err, PretrainedWeightsError) and err.path == str(path)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)  # no chained traceback


def test_missing_file_is_file_not_found(files):
    """timm raised `FileNotFoundError()` (empty message): the type stays, the message says what is missing."""
    err = _raises(FileNotFoundError, '/missing.safetensors', 'not found', fn=_load, file='/missing.safetensors')
    assert isinstance(err, CheckpointNotFoundError)


def test_full_unpickle_never_runs(files):
    """A checkpoint needing a full unpickle is refused with weights_only=True: its code never runs."""
    _raises(CheckpointError, 'only a full unpickle', fn=_load, file=files['dir'] / 'pickled.pth')
    assert not files['marker'].exists()


def test_unexpanded_home():
    _raises(CheckpointNotFoundError, '~/weights.safetensors', 'does not expand ~', fn=_load,
            file='~/weights.safetensors')


def test_url_download_failure(tmp_path):
    """A `url` source that cannot be reached: urllib's error names no URL, ours does."""
    url = 'http://127.0.0.1:9/no_such_weights.pth'  # the discard port: refused at once
    _raises(CheckpointError, url, 'download failed', fn=timm.create_model, model_name=NAME, pretrained=True,
            pretrained_cfg_overlay=dict(url=url), cache_dir=str(tmp_path))


def test_folder_as_file(files):
    _raises(CheckpointError, str(files['dir']), 'is a folder', fn=_load, file=files['dir'])
    _raises(CheckpointError, 'is a folder', f"local-dir:{files['folder']}", fn=_load, file=files['folder'])


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='root reads any file')
def test_unreadable_file(files, tmp_path):
    path = tmp_path / 'locked.safetensors'
    path.write_bytes(files['good'].read_bytes())
    path.chmod(0)
    _raises(CheckpointError, str(path), 'permission denied', fn=_load, file=path)


def test_state_dict_source_nan(files):
    """`pretrained_cfg_overlay=dict(state_dict=...)` goes through the same checks."""
    _raises(CheckpointError, 'state_dict of the pretrained cfg', 'conv1.weight (1 NaN)', fn=timm.create_model,
            model_name=NAME, pretrained=True, pretrained_cfg_overlay=dict(state_dict=files['nan_sd']))


def test_hints_lead_to_a_load(files):
    """What the hints say works: the checkpoint's classes declared (and a new head), its stem, its head dim."""
    c100 = files['dir'] / 'c100.safetensors'
    _same(_load(c100, overlay=dict(num_classes=100)), _sd(files['c100']))
    model = _load(c100, overlay=dict(num_classes=100), num_classes=10)
    assert model.fc.out_features == 10
    _same(model, {k: v for k, v in _sd(files['c100']).items() if not k.startswith('fc.')} | {
        'fc.weight': model.fc.weight, 'fc.bias': model.fc.bias})
    grey = files['dir'] / 'grey.safetensors'
    _same(_load(grey, overlay=dict(input_size=(1, 32, 32))), _sd(files['grey']))
    rgb = _load(grey, overlay=dict(input_size=(1, 32, 32)), in_chans=3)
    assert torch.equal(rgb.conv1.weight, adapt_input_conv(3, files['grey'].conv1.weight.detach(), base_chans=1))
    _load(files['dir'] / 'head_dim8.safetensors', head_dim=8)


# -----------------------------------------------------------------------------------------------------------
# What works must keep working, bit for bit
# -----------------------------------------------------------------------------------------------------------

def test_good_checkpoints_load_exactly(files):
    sd = files['sd']
    _same(_load(files['good']), sd)
    _same(_load(files['good_pth']), sd)
    _same(_load(files['dir'] / 'module.pth'), sd)
    _same(_load(files['dir'] / 'ema.pth'), _sd(files['ema']))  # timm prefers the EMA weights
    _same(timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(state_dict=dict(sd))), sd)


def test_timm_adaptation_keeps_working(files):
    """A changed num_classes drops the classifier, a changed in_chans adapts the stem (timm's own rules)."""
    sd = files['sd']
    model = _load(files['good'], num_classes=5)
    assert model.fc.out_features == 5
    _same(model, sd | {'fc.weight': model.fc.weight, 'fc.bias': model.fc.bias})
    grey = _load(files['good'], in_chans=1)
    assert torch.equal(grey.conv1.weight, sd['conv1.weight'].sum(1, keepdim=True))
    feats = _load(files['good'], features_only=True)
    assert len(feats(torch.randn(1, 3, 32, 32))) == 4
    # pretrained_strict=False: missing keys stay at init, as in timm
    partial = {k: v for k, v in sd.items() if '.attn.' not in k}
    model = timm.create_model(NAME, pretrained=True, pretrained_strict=False,
                              pretrained_cfg_overlay=dict(state_dict=partial))
    assert torch.equal(model.conv1.weight, sd['conv1.weight'])


def test_constructor_errors_are_not_rewritten(files):
    """An invalid model argument is the constructor's error, not a checkpoint error."""
    with pytest.raises(Exception) as info:
        _load(files['good'], head_dim=7)
    assert not isinstance(info.value, CheckpointError)


# -----------------------------------------------------------------------------------------------------------
# local-dir:
# -----------------------------------------------------------------------------------------------------------

def _folder(root: Path, name: str, src: Path, config: Any = True, weights: Any = True) -> Path:
    folder = root / name
    folder.mkdir()
    if config is True:
        (folder / 'config.json').write_bytes((src / 'config.json').read_bytes())
    elif config is not None:
        (folder / 'config.json').write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is True:
        (folder / 'model.safetensors').write_bytes((src / 'model.safetensors').read_bytes())
    elif isinstance(weights, tuple):
        (folder / weights[0]).write_bytes(weights[1])
    return folder


def _local(folder: Path, **kwargs) -> torch.nn.Module:
    return timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)


def test_local_dir(files, tmp_path):
    src = files['folder']
    raw = (src / 'model.safetensors').read_bytes()
    config = json.loads((src / 'config.json').read_text())
    _same(_local(src), files['sd'])
    # timm's fallback: any *.pth when no preferred name is there
    _same(_local(_folder(tmp_path, 'renamed', src, weights=('weights.pth', files['good_pth'].read_bytes()))),
          files['sd'])

    folder = _folder(tmp_path, 'noweights', src, weights=None)
    err = _raises(CheckpointNotFoundError, f'local-dir:{folder}', 'no weights file', fn=_local, folder=folder)
    assert isinstance(err, FileNotFoundError)
    folder = _folder(tmp_path, 'truncated', src, weights=('model.safetensors', raw[:2000]))
    _raises(CheckpointError, str(folder / 'model.safetensors'), 'truncated or corrupt', fn=_local, folder=folder)
    folder = _folder(tmp_path, 'empty', src, weights=('model.safetensors', b''))
    _raises(CheckpointError, str(folder / 'model.safetensors'), 'file is empty', fn=_local, folder=folder)
    folder = _folder(tmp_path, 'nan', src, weights=(
        'model.safetensors', (files['dir'] / 'nan.safetensors').read_bytes()))
    _raises(CheckpointError, str(folder / 'model.safetensors'), 'conv1.weight (1 NaN)', fn=_local, folder=folder)
    folder = _folder(tmp_path, 'other_arch', src, weights=(
        'model.safetensors', (files['dir'] / 'mrlal.safetensors').read_bytes()))
    _raises(CheckpointMismatchError, str(folder), "create 'cifar_resnet20_mrlal'", fn=_local, folder=folder)
    folder = _folder(tmp_path, 'pickled', src, weights=('model.pth', (files['dir'] / 'pickled.pth').read_bytes()))
    (folder / 'model.safetensors').unlink(missing_ok=True)
    _raises(CheckpointError, str(folder / 'model.pth'), 'only a full unpickle', fn=_local, folder=folder)

    # timm's own errors: raised by timm.create_model while reading config.json, before this package's code runs
    _raises(FileNotFoundError, 'Config file not found', str(tmp_path / 'absent'), fn=_local,
            folder=tmp_path / 'absent')
    folder = _folder(tmp_path, 'noconfig', src, config=None)
    _raises(FileNotFoundError, 'Config file not found', str(folder / 'config.json'), fn=_local, folder=folder)
    folder = _folder(tmp_path, 'badconfig', src, config='{"architecture": ')
    _raises(json.JSONDecodeError, 'Expecting value', fn=_local, folder=folder)
    folder = _folder(tmp_path, 'unknown', src, config=dict(config, architecture='no_such_model'))
    _raises(RuntimeError, 'Unknown model (no_such_model)', fn=_local, folder=folder)


# -----------------------------------------------------------------------------------------------------------
# hf-hub:
# -----------------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    import timm, timm_layerattn
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from timm_layerattn.pretrained import CheckpointError
    spec = json.load(open(sys.argv[1]))
    for repo, name in spec.get('prefetch', []):
        hf_hub_download(repo, name)
    report = {}
    for case in spec['cases']:
        if case.get('register'):
            timm_layerattn.register_pretrained(case['register'], hf_hub_id=case['hf_hub_id'])
        try:
            model = timm.create_model(case['model'], pretrained=True)
            total = float(sum(v.double().sum() for v in model.state_dict().values()))
            report[case['name']] = {'ok': True, 'sum': total}
        except Exception as e:
            report[case['name']] = {
                'ok': False, 'error': type(e).__name__, 'message': str(e),
                'checkpoint_error': isinstance(e, CheckpointError),
                'not_cached': isinstance(e, LocalEntryNotFoundError),
                'file_not_found': isinstance(e, FileNotFoundError),
                'suppressed': e.__cause__ is None and (e.__context__ is None or bool(e.__suppress_context__))}
    json.dump(report, open(sys.argv[2], 'w'))
''')


class _Hub:
    def __init__(self, tmp: Path, files: Dict[str, Any]):
        self.tmp = tmp
        self.hub = FakeHub().start()
        folder = {p.name: p.read_bytes() for p in files['folder'].iterdir()}
        config_only = {k: v for k, v in folder.items() if k != 'model.safetensors'}
        self.hub.add_commit('acme/good', folder)
        self.hub.add_commit('acme/corrupt', dict(folder, **{'model.safetensors': folder['model.safetensors'][:3000]}))
        self.hub.add_commit('acme/noweights', config_only)
        buf = io.BytesIO()
        torch.save([1, 2], buf)
        self.hub.add_commit('acme/listbin', dict(config_only, **{'pytorch_model.bin': buf.getvalue()}))
        self.hub.add_commit('acme/pickled', dict(config_only, **{
            'pytorch_model.bin': (files['dir'] / 'pickled.pth').read_bytes()}))
        self.hub.add_commit('acme/nan', dict(folder, **{
            'model.safetensors': (files['dir'] / 'nan.safetensors').read_bytes()}))
        self.hub.add_commit('acme/partial', folder)
        self.expected_sum = float(sum(v.double().sum() for v in files['sd'].values()))
        (tmp / 'child.py').write_text(_CHILD)
        self.runs = 0

    def run(self, cases, prefetch=(), **env):
        self.runs += 1
        spec, out = self.tmp / f'spec{self.runs}.json', self.tmp / f'report{self.runs}.json'
        spec.write_text(json.dumps({'cases': cases, 'prefetch': list(prefetch)}))
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_'))}
        child_env.update(
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]),
            HF_ENDPOINT=self.hub.endpoint, HF_HOME=str(self.tmp / 'hf_home'), HF_HUB_DISABLE_TELEMETRY='1',
            HF_HUB_DISABLE_PROGRESS_BARS='1', OMP_NUM_THREADS='1', **env)
        r = subprocess.run([sys.executable, str(self.tmp / 'child.py'), str(spec), str(out)], env=child_env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(out.read_text())


def _one_line(report, case, error, *fragments):
    got = report[case]
    assert not got['ok'] and got['error'] == error, got
    assert '\n' not in got['message'] and all(f in got['message'] for f in fragments), (fragments, got['message'])
    return got


def test_hub(files, tmp_path):
    """One online process fills the cache (and meets the repo-side problems), one offline process reads it."""
    hub = _Hub(tmp_path, files)
    try:
        cache = tmp_path / 'hf_home' / 'hub'
        online = hub.run([{'name': n, 'model': f'hf-hub:acme/{n}'}
                          for n in ('good', 'corrupt', 'noweights', 'listbin', 'pickled', 'nan')],
                         prefetch=[('acme/partial', 'config.json')])
        assert online['good']['ok'] and online['good']['sum'] == hub.expected_sum
        got = _one_line(online, 'corrupt', 'CheckpointError', 'hf-hub:acme/corrupt', 'model.safetensors',
                        'truncated or corrupt', f"delete {cache / 'models--acme--corrupt'} to download it again")
        assert got['suppressed']
        got = _one_line(online, 'noweights', 'CheckpointNotFoundError', 'hf-hub:acme/noweights', 'no weights file')
        assert got['file_not_found']
        _one_line(online, 'listbin', 'CheckpointError', 'hf-hub:acme/listbin', 'pytorch_model.bin', 'holds a list')
        _one_line(online, 'pickled', 'CheckpointError', 'hf-hub:acme/pickled', 'pytorch_model.bin',
                  'only a full unpickle', 'weights_only=True')
        _one_line(online, 'nan', 'CheckpointError', 'hf-hub:acme/nan', 'model.safetensors', 'conv1.weight (1 NaN)')

        before = len(hub.hub.requests)
        offline = hub.run([
            {'name': 'good', 'model': 'hf-hub:acme/good'},
            {'name': 'corrupt', 'model': 'hf-hub:acme/corrupt'},
            {'name': 'partial', 'model': 'hf-hub:acme/partial'},
            {'name': 'registered', 'model': f'{NAME}.acme', 'register': f'{NAME}.acme', 'hf_hub_id': 'acme/never'},
            {'name': 'never', 'model': 'hf-hub:acme/never'},
        ], HF_HUB_OFFLINE='1')
        assert len(hub.hub.requests) == before, hub.hub.requests[before:]
        assert offline['good']['ok'] and offline['good']['sum'] == hub.expected_sum
        _one_line(offline, 'corrupt', 'CheckpointError', 'hf-hub:acme/corrupt', 'truncated or corrupt')
        for case in ('partial', 'registered'):  # config cached / registered tag, weights never downloaded
            repo = 'acme/partial' if case == 'partial' else 'acme/never'
            got = _one_line(offline, case, 'CheckpointNotCachedError', f'hf-hub:{repo}', 'not in the local Hub cache',
                            'HF_HUB_OFFLINE=1')
            assert got['not_cached'] and got['checkpoint_error']
        # huggingface_hub's own error: config.json is fetched by timm.create_model before this package's code runs
        got = offline['never']
        assert not got['ok'] and got['error'] == 'LocalEntryNotFoundError' and not got['checkpoint_error']
    finally:
        hub.hub.stop()


def test_error_types_for_callers():
    """Every checkpoint error is a `PretrainedWeightsError` (and so a one-line CLI `UserError`)."""
    from timm_layerattn._utils.errors import UserError
    for cls in (CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, CheckpointNotCachedError):
        assert issubclass(cls, PretrainedWeightsError) and issubclass(cls, UserError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------------
# load_trunk and the one reader (timm train.py checkpoints through every entry point)
# ---------------------------------------------------------------------------------------------------------------

def _train_py_checkpoint(path: Path, sd: Dict[str, torch.Tensor]) -> Path:
    """What timm's train.py saves: its argparse.Namespace under `args`, the weights under `state_dict`."""
    import argparse
    torch.save({'epoch': 3, 'arch': 'cifar_resnet20', 'args': argparse.Namespace(model='cifar_resnet20', lr=0.1),
                'state_dict': sd, 'optimizer': {}, 'version': 2}, path)
    return path


def test_load_trunk_refusals(tmp_path, caplog):
    from timm_layerattn import load_trunk
    from timm_layerattn._utils import UserError
    model = timm.create_model('cifar_resnet20_kcla')
    with pytest.raises(TypeError, match='load_trunk: source must be a timm model name, a checkpoint file or a '
                                        'state dict, got None'):
        load_trunk(model, None)
    # a source of another architecture: nothing fits the trunk
    other = {'features.0.weight': torch.randn(8, 3, 3, 3), 'features.0.bias': torch.randn(8),  # a VGG's layout
             'classifier.weight': torch.randn(10, 8), 'bn1.num_batches_tracked': torch.tensor(5)}
    with pytest.raises(UserError, match='no tensor of the state dict matches a trunk tensor of the model'):
        load_trunk(model, other)
    # NaN / Inf weights, named
    sd = timm.create_model('cifar_resnet20').state_dict()
    bad = dict(sd, **{'layer1.0.conv1.weight': sd['layer1.0.conv1.weight'].clone().fill_(float('inf'))})
    with pytest.raises(UserError, match=r'non-finite values \(NaN or inf\) in 1 tensor\(s\): layer1.0.conv1.weight'):
        load_trunk(model, bad)
    with pytest.raises(UserError, match="'nope.pth' is neither an existing file nor a timm model name"):
        load_trunk(model, 'nope.pth')
    # a partial load (trunk tensors left at init) is a WARNING with the counts
    partial = {k: v for k, v in sd.items() if not k.startswith('layer3.')}
    with caplog.at_level('INFO', logger='timm_layerattn.convert'):
        result = load_trunk(model, partial)
    warnings = [r for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'partial load' in warnings[0].getMessage()
    left = sum(1 for k in result.missing if k.startswith('layer3.') and '.attn.' not in k)
    assert f'{left} of ' in warnings[0].getMessage() and left > 0
    caplog.clear()
    with caplog.at_level('INFO', logger='timm_layerattn.convert'):
        load_trunk(model, sd)  # full: INFO only
    assert not [r for r in caplog.records if r.levelname == 'WARNING']


@pytest.mark.parametrize('in_chans', [1, 4])
def test_load_trunk_adapts_the_first_conv(in_chans):
    from timm_layerattn import load_trunk
    sd = timm.create_model('cifar_resnet20').state_dict()
    model = timm.create_model('cifar_resnet20_kcla', in_chans=in_chans)
    result = load_trunk(model, sd)
    assert 'conv1.weight' in result.loaded and 'conv1.weight' in result.adapted
    assert torch.equal(model.state_dict()['conv1.weight'], adapt_input_conv(in_chans, sd['conv1.weight']))
    assert 'adapted from 3 to' in result.summary()


def test_train_py_checkpoint_everywhere(tmp_path, capsys):
    """A timm train.py checkpoint (argparse Namespace inside) is read by every entry point through the one reader."""
    from timm_layerattn import load_trunk
    from timm_layerattn.cli import main
    from timm_layerattn.checkpoints.io import read_state_dict
    sd = _sd(_model('cifar_resnet20'))
    path = _train_py_checkpoint(tmp_path / 'train_py.pth.tar', sd)
    got, container = read_state_dict(path)
    assert container == 'state_dict' and set(got) == set(sd)
    model = timm.create_model('cifar_resnet20_kcla')
    assert len(load_trunk(model, path).loaded) == len(sd)
    assert main(['convert', '--model', 'cifar_resnet20', str(path), str(tmp_path / 'c.safetensors')]) == 0
    assert main(['export', 'cifar_resnet20', '--checkpoint', str(path), '--out', str(tmp_path / 'exp')]) == 0
    loaded = timm.create_model('cifar_resnet20', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _same(loaded, sd)
    from timm_layerattn.train.checkpoint import read_checkpoint, read_initial_checkpoint
    assert set(read_initial_checkpoint(str(path))) == set(sd)
    assert read_checkpoint(str(path))['epoch'] == 3
    capsys.readouterr()
