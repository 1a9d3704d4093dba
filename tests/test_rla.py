"""RLA-Net (docs/design/rla.md): parameter counts against the official code, official checkpoints (the
published layout, tests/_official_rla.py) converted strictly and run against the official forward, the
stream's placement, and the family's kwargs and refusals. The `#rla-...` anchors are sections of
docs/design/rla.md."""
import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.checkpoints import read_raw
from timm_layerattn.checkpoints.rla import RULES
from timm_layerattn.cli import main as cli_main
from timm_layerattn.convert import convert_official_with_report
from timm_layerattn.pretrained import PretrainedWeightsError

from _official_rla import num_params, official_forward, official_shapes, official_state_dict, training_checkpoint

# Measured with the official `rla_resnet50()` / `rla_resnet101()` (#rla-param-counts); the README's 24.67 M /
# 42.92 M are these counts divided by 2^20.
OFFICIAL_PARAMS = {'resnet50_rla': (50, 25_870_696), 'resnet101_rla': (101, 45_003_176)}


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _converted(name: str, seed: int = 0, **kwargs):
    depth = OFFICIAL_PARAMS[name][0]
    sd = official_state_dict(depth, seed=seed)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(convert_official(training_checkpoint(sd), name))
    return model.eval(), sd


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (#rla-param-counts)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(OFFICIAL_PARAMS))
def test_param_counts_match_official(name):
    depth, expected = OFFICIAL_PARAMS[name]
    assert num_params(official_shapes(depth)) == expected
    assert _n_params(timm.create_model(name, device='meta')) == expected
    assert round(expected / 2 ** 20, 2) == {50: 24.67, 101: 42.92}[depth]  # the README's unit


def test_rla_channel_changes_only_the_stream():
    base, k16 = (_n_params(timm.create_model('resnet50_rla', device='meta', rla_channel=k)) for k in (32, 16))
    # per block: conv1 reads k more channels; per stage: W_out (C_s k) and W_rec (9 k^2); BNs (2k each); fc (k)
    widths, planes, depths = (256, 512, 1024, 2048), (64, 128, 256, 512), (3, 4, 6, 3)

    def extra(k):
        return (k * sum(p * n for p, n in zip(planes, depths)) + sum(k * c + 9 * k * k for c in widths)
                + 2 * k * (sum(depths) + 1) + 1000 * k)
    assert base - k16 == extra(32) - extra(16)
    assert num_params(official_shapes(50, rla_chs=16)) == k16


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints: strict conversion and parity (#rla-conversion)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(OFFICIAL_PARAMS))
def test_eval_parity_with_official_forward(name):
    model, sd = _converted(name)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x), official_forward(sd, x)
    assert _rel(ours, ref) < 1e-4
    assert torch.equal(ours.argmax(1), ref.argmax(1))


def test_train_mode_parity_with_official_forward():
    model, sd = _converted('resnet50_rla', seed=1)
    model.train()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(model(x), official_forward(sd, x, training=True)) < 1e-4


def test_features_match_the_official_detection_backbone():
    """The feature levels are the stage outputs x (the official MMDetection backbone's outputs), not concat(x, h)."""
    model, sd = _converted('resnet50_rla', seed=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        ref = official_forward(sd, x, stages=True)
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    for ours, theirs in zip(feats, ref):
        assert _rel(ours, theirs) < 1e-4


def test_conversion_report_is_strict_and_drops_nothing():
    sd = official_state_dict(50)
    out, report = convert_official_with_report(training_checkpoint(sd), 'resnet50_rla')
    assert report.family == 'rla' and report.dropped == [] and report.num_tensors == len(sd)
    assert out['layer2.attn_in.recurrent_conv.weight'] is sd['recurrent_convs.1.weight']
    assert out['layer3.5.attn.bn.running_var'] is sd['stage_bns.2.5.running_var']
    assert out['layer4.0.conv1.weight'].shape == (512, 1024 + 32, 1, 1)
    assert out['neck.bn.weight'] is sd['bn2.weight']

    extra = dict(sd, **{'recurrent_convs.4.weight': torch.zeros(32, 32, 3, 3)})
    with pytest.raises(UserError, match='recurrent_convs.4.weight'):
        convert_official(extra, 'resnet50_rla')
    missing = {k: v for k, v in sd.items() if not k.startswith('stage_bns.1.2.')}
    with pytest.raises(UserError, match='layer2.2.attn.bn'):
        convert_official(missing, 'resnet50_rla')


def test_refusals_say_what_to_do():
    sd = official_state_dict(50)
    with pytest.raises(UserError, match=r"rla_channel=16"):
        convert_official(official_state_dict(50, rla_chs=16), 'resnet50_rla')
    eca = dict(sd, **{'stages.0.0.eca.conv.weight': torch.zeros(1, 1, 5)})
    with pytest.raises(UserError, match='RLA-ECANet'):
        convert_official(eca, 'resnet50_rla')
    with pytest.raises(UserError, match='3-4-6-3 blocks per stage'):
        convert_official(sd, 'resnet101_rla')
    with pytest.raises(UserError, match="official rla checkpoint"):
        convert_official(sd, 'resnet50_kcla')


def test_narrower_stream_loads_through_the_filter_when_the_model_has_it():
    sd = official_state_dict(50, rla_chs=16, seed=6)
    model = timm.create_model('resnet50_rla', rla_channel=16)
    model.load_state_dict(RULES.filter(training_checkpoint(sd), model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(model.eval()(x), official_forward(sd, x)) < 1e-4


def test_published_file_converts_with_one_command_and_loads_as_it_is(tmp_path):
    """The published `.pth.tar` (train.py's container, `module.` keys) -> `timm-layerattn convert` -> the same
    top-1 as the official forward; timm's `pretrained=True` also reads the file as it is (#rla-weights)."""
    sd = official_state_dict(50, seed=4)
    src, dst = tmp_path / 'resnet50_rla_2283.pth.tar', tmp_path / 'resnet50_rla.safetensors'
    torch.save(training_checkpoint(sd), src)
    assert cli_main(['convert', str(src), str(dst), '--model', 'resnet50_rla']) == 0
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = official_forward(sd, x)
    for file in (dst, src):
        model = timm.create_model('resnet50_rla', pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        with torch.no_grad():
            logits = model.eval()(x)
        assert _rel(logits, ref) < 1e-4 and torch.equal(logits.argmax(1), ref.argmax(1))
    assert sorted(read_raw(dst)[0]) == sorted(timm.create_model('resnet50_rla', device='meta').state_dict())


def test_published_tags_point_at_the_authors_files_and_never_download():
    cfg = timm.create_model('resnet50_rla', device='meta').pretrained_cfg
    assert cfg['tag'] == 'rlanet_in1k' and '1cetP1SdOiwznLxlBUaHG8Q8c4RIwToWW' in ' '.join(cfg['notes'])
    assert '1V9Iv0KbN1O92ll8rcf45kLkD9EOA9VCE' in ' '.join(
        timm.create_model('resnet101_rla', device='meta').pretrained_cfg['notes'])
    assert cfg['interpolation'] == 'bilinear' and cfg['crop_pct'] == 0.875  # Resize(256) + CenterCrop(224)
    with pytest.raises(PretrainedWeightsError, match=r"rlanet_in1k' .*\(Published by the RLA-Net authors .*"
                                                   r"1cetP1SdOiwznLxlBUaHG8Q8c4RIwToWW"):
        timm.create_model('resnet50_rla', pretrained=True)  # the error says where the weights are


# ---------------------------------------------------------------------------------------------------------------
# The stream (#rla-maths, #rla-quirk-odd-sizes) and the kwargs
# ---------------------------------------------------------------------------------------------------------------

def test_odd_maps_run_where_the_official_code_fails():
    """A 72 px input gives 9 -> 5 px maps: the official floor-mode pool makes h 4 px and its concat fails; ours
    rounds up like the strided convs (#rla-quirk-odd-sizes)."""
    model, sd = _converted('resnet50_rla')
    x = torch.randn(1, 3, 72, 72)
    with pytest.raises(RuntimeError):
        official_forward(sd, x)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_stream_modules_sit_where_the_design_says():
    model = timm.create_model('resnet50_rla', device='meta')
    assert [m.pool for m in (model.layer1[1].attn, model.layer2[1].attn, model.layer2[2].attn)] == [1, 2, 1]
    assert model.layer1.get_submodule('0').conv1.in_channels == 64 + 32
    assert model.layer3.get_submodule('0').downsample[0].in_channels == 512  # the residual keeps x
    assert model.num_features == 2048 + 32 and model.fc.in_features == 2080


def test_dilated_model_keeps_the_stream_at_full_resolution():
    model = timm.create_model('resnet50_rla', output_stride=16).eval()
    assert model.layer4.get_submodule('0').attn.pool == 1
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2080, 4, 4)


@pytest.mark.parametrize('value', [0, -1, 1.5, True, '32'])
def test_bad_rla_channel_is_a_one_line_error(value):
    with pytest.raises((ValueError, TypeError), match=r'^resnet50_rla: rla_channel must be a positive integer'):
        timm.create_model('resnet50_rla', rla_channel=value, device='meta')


def test_rla_channel_is_refused_by_other_families():
    with pytest.raises(TypeError, match='rla_channel'):
        timm.create_model('resnet50_kcla', rla_channel=16, device='meta')


@pytest.mark.slow
def test_exports_to_onnx_at_odd_sizes(tmp_path):
    """The stream's rounding-up pool exports as an ONNX AveragePool over valid pixels: onnxruntime matches at an
    even and at an odd size (#rla-quirk-odd-sizes)."""
    ort = pytest.importorskip('onnxruntime')
    from timm_layerattn.hub import export_onnx
    model, _ = _converted('resnet50_rla')
    result = export_onnx(model, tmp_path / 'm.onnx', input_size=(3, 64, 64))
    assert all(c.max_rel_err <= 1e-4 for c in result.checks)
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        ref = model(x)
    got = ort.InferenceSession(str(tmp_path / 'm.onnx')).run(None, {'input0': x.numpy()})[0]
    assert _rel(torch.from_numpy(got), ref) <= 1e-4
