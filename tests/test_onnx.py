"""ONNX export (`timm-layerattn export --onnx`, `hub.export_onnx`): dynamic batch / height / width, the onnxruntime
check before anything is written, the features_only backbone, the card's snippet, the files a push uploads.

Each export captures the graph with torch.export (5-15 s for a CIFAR model on one core), so every test exports once.
"""
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the architectures)
from timm_layerattn._utils.errors import UserError
from timm_layerattn.cli import main as cli_main
from timm_layerattn.hub import export_onnx, is_export_folder
from timm_layerattn.hub import onnx as hub_onnx

from _layer_attn import trained_like

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
pytest.importorskip('onnx')

NAME = 'cifar_resnet20_kcla'


def _cli(capsys, *args):
    rc = cli_main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err




def _run(path: Path, x: torch.Tensor):
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'input0': x.numpy()})


def _rel_err(ref: torch.Tensor, got: np.ndarray) -> float:
    assert tuple(got.shape) == tuple(ref.shape)
    return float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope='module')
def kcla_export(tmp_path_factory):
    """`export --onnx` of a checkpoint (the classifier), run once for the tests below."""
    tmp = tmp_path_factory.mktemp('onnx')
    model = trained_like(NAME)
    safetensors.torch.save_file(model.state_dict(), str(tmp / 'w.safetensors'))
    rc = cli_main(['export', NAME, '--checkpoint', str(tmp / 'w.safetensors'), '--out', str(tmp / 'out'), '--onnx',
                   '--tag', 'mylab_cifar10'])
    assert rc == 0
    return model, tmp / 'out'


@pytest.mark.xdist_group('onnx-kcla')  # one worker: the export fixture runs once
def test_export_onnx_folder(kcla_export):
    model, out = kcla_export
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.onnx', 'model.safetensors']
    assert is_export_folder(out)
    record = json.loads((out / 'config.json').read_text())['timm_layerattn']['onnx']
    assert record['file'] == 'model.onnx' and record['opset'] == hub_onnx.OPSET == 18
    assert record['input'] == 'input0' and record['outputs'] == ['output0'] and not record['features_only']
    assert [c['shape'] for c in record['checked']] == [[1, 3, 32, 32], [2, 3, 41, 47]]
    assert all(c['max_rel_err'] <= 1e-4 for c in record['checked'])
    import onnx
    graph = onnx.load(str(out / 'model.onnx'))
    assert [o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')] == [18]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']
    # an independent run at a third shape, against the folder as timm loads it
    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(3, 3, 28, 36)
    with torch.no_grad():
        ref = reloaded(x)
    assert _rel_err(ref, _run(out / 'model.onnx', x)[0]) <= 1e-4


@pytest.mark.xdist_group('onnx-kcla')  # one worker: the export fixture runs once
def test_card_onnx_snippet_runs(kcla_export, monkeypatch):
    """The card's ONNX section states the opset and its snippet runs as written (the download replaced by the
    local file)."""
    from PIL import Image
    model, out = kcla_export
    card = (out / 'README.md').read_text()
    assert '| Weights | `model.safetensors`, `model.onnx` (ONNX opset 18)' in card
    section = card[card.index('### ONNX'):]
    assert 'Opset 18' in section and 'batch, height and width dynamic' in section
    code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    assert "hf_hub_download('<your-org>/cifar_resnet20_kcla.mylab_cifar10', 'model.onnx')" in code
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', lambda repo, name: str(out / name))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    scope = {'img': img}
    exec(code, scope)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    with torch.no_grad():
        ref = model(timm.data.create_transform(**data_cfg)(img).unsqueeze(0))
    assert _rel_err(ref, scope['logits']) <= 1e-4


@pytest.mark.xdist_group('onnx-kcla')  # one worker: the export fixture runs once
def test_push_uploads_the_onnx_file(kcla_export, capsys, tmp_path):
    _, out = kcla_export
    rc, text, err = _cli(capsys, 'push', out, '--repo-id', 'acme/x', '--dry-run')
    assert rc == 0, err
    assert re.search(r'^  model\.onnx +[\d,]+ bytes', text, re.M) and 'not uploaded' not in text
    # a model.onnx that config.json does not record (not written by export --onnx) stays local
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(out, copy)
    config = json.loads((copy / 'config.json').read_text())
    del config['timm_layerattn']['onnx']
    (copy / 'config.json').write_text(json.dumps(config))
    rc, text, err = _cli(capsys, 'push', copy, '--repo-id', 'acme/x', '--dry-run')
    assert rc == 0, err
    assert 'not uploaded: model.onnx' in text and not re.search(r'^  model\.onnx', text, re.M)


def test_export_onnx_features_only(tmp_path, capsys):
    """`--features-only --out-indices`: model.onnx is the backbone timm builds with features_only=True."""
    model = trained_like('cifar_resnet20_mrlab', seed=1)
    torch.save({'state_dict': model.state_dict(), 'epoch': 4}, tmp_path / 'last.pth.tar')
    rc, text, err = _cli(capsys, 'export', 'cifar_resnet20_mrlab', '--checkpoint', tmp_path / 'last.pth.tar',
                         '--out', tmp_path / 'out', '--onnx', '--features-only', '--out-indices', '1', '3')
    assert rc == 0, err
    assert 'model.onnx (features_only backbone, outputs output0, output1; opset 18' in text
    record = json.loads((tmp_path / 'out' / 'config.json').read_text())['timm_layerattn']['onnx']
    assert record['features_only'] and record['feature_info']['out_indices'] == [1, 3]
    backbone = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True, features_only=True,
                                 out_indices=(1, 3)).eval()
    assert record['feature_info']['channels'] == backbone.feature_info.channels()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        refs = backbone(x)
    got = _run(tmp_path / 'out' / 'model.onnx', x)
    assert len(got) == len(refs) == 2
    assert all(_rel_err(r, g) <= 1e-4 for r, g in zip(refs, got))
    assert 'features = session.run(' in (tmp_path / 'out' / 'README.md').read_text()


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    """A graph that does not compute what the model does fails the export, and no folder is left."""
    real_capture = hub_onnx._capture

    def capture_another_model(model, example, names, opset):
        import copy
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.fc.bias.add_(1.0)
        return real_capture(other, example, names, opset)

    monkeypatch.setattr(hub_onnx, '_capture', capture_another_model)
    safetensors.torch.save_file(trained_like('cifar_resnet20').state_dict(), str(tmp_path / 'w.safetensors'))
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = _cli(capsys, 'export', 'cifar_resnet20', '--checkpoint', tmp_path / 'w.safetensors', '--out',
                      tmp_path / 'out', '--onnx')
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert 'ONNX check failed at input shape [1, 3, 32, 32]: output 0 differs from PyTorch' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_onnx_packages_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import fails as if not installed
    safetensors.torch.save_file(timm.create_model(NAME).state_dict(), str(tmp_path / 'w.safetensors'))
    rc, _, err = _cli(capsys, 'export', NAME, '--checkpoint', tmp_path / 'w.safetensors', '--out', tmp_path / 'o',
                      '--onnx')
    assert rc == 2 and 'ONNX export needs onnxruntime, not installed: pip install onnx onnxruntime onnxscript' in err
    assert not (tmp_path / 'o').exists()
    with pytest.raises(UserError, match='pip install onnx onnxruntime onnxscript'):
        export_onnx(timm.create_model(NAME), tmp_path / 'm.onnx')


def test_features_only_options_need_onnx(tmp_path, capsys):
    safetensors.torch.save_file(timm.create_model(NAME).state_dict(), str(tmp_path / 'w.safetensors'))
    base = ['export', NAME, '--checkpoint', tmp_path / 'w.safetensors', '--out', tmp_path / 'o']
    for extra, reason in ((['--features-only'], 'add --onnx'),
                          (['--onnx', '--out-indices', '1'], '--out-indices selects the feature levels'),
                          (['--onnx', '--features-only', '--out-indices', '9'], 'out of range')):
        rc, _, err = _cli(capsys, *base, *extra)
        assert rc == 2 and reason in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / 'o').exists()


@pytest.mark.slow
@pytest.mark.parametrize('name,input_size', [
    ('cifar_resnet20_mrlal', None),
    ('cifar_resnet50_as_kv', None),
    ('cifar_resnet20_basic_mha', None),
    ('resnet18_gradattn_rope', (3, 64, 64)),
    ('efficientnet_b0_mrlal', (3, 64, 64)),
])
def test_every_family_exports(tmp_path, name, input_size):
    """The families the CLI tests above do not cover (KCLA, MRLA-B there): classifier, dynamic shapes, 1e-4."""
    model = trained_like(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = export_onnx(model, tmp_path / 'm.onnx', input_size=input_size)
    assert [c.shape[0] for c in result.checks] == [1, 2] and result.checks[0].shape[2:] != result.checks[1].shape[2:]
    assert all(c.max_rel_err <= 1e-4 for c in result.checks)
    assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    h, w = (input_size or model.pretrained_cfg['input_size'])[1:]
    x = torch.randn(3, 3, h - 5, w + 9)
    with torch.no_grad():
        ref = model(x)
    assert _rel_err(ref, _run(tmp_path / 'm.onnx', x)[0]) <= 1e-4
