"""SE / ECA / DIANet CIFAR baselines: parameter counts against the official code, parity with the official forward
after `convert_official` (tests/_official_gates.py), DIANet's carried state, the converter's reports and refusals,
and argument errors. The `#cg-...` anchors are sections of docs/design/channel_gates.md."""
import pytest
import timm
import torch

from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.convert import convert_official_with_report, detect_official_family
from timm_layerattn.layers.gates import DIACell, EcaGate, SEGate
from timm_layerattn.models.cifar_resnet_gates import ChannelGates

from _official import materialize, numel
from _official_gates import (
    OFFICIAL_PARAMS, never_run_se_keys, official_gate_forward, official_gate_shapes)

DEPTHS = (20, 56, 110)
SHORT = {'se': 'se', 'eca': 'eca', 'dianet': 'dia'}  # official family -> model suffix


def n_params(name: str, **kwargs) -> int:
    return sum(p.numel() for p in timm.create_model(name, device='meta', **kwargs).parameters())


def _x(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (#cg-param-counts)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', list(OFFICIAL_PARAMS))
@pytest.mark.parametrize('depth', DEPTHS)
def test_official_layout_has_the_measured_count(kind, depth):
    """The test-side official layout is pinned to the official builders' parameter counts."""
    assert numel(official_gate_shapes(kind, depth)) == OFFICIAL_PARAMS[kind][depth]


@pytest.mark.parametrize('kind', list(OFFICIAL_PARAMS))
@pytest.mark.parametrize('depth', DEPTHS)
def test_param_counts_match_official_minus_never_run_se(kind, depth):
    """ECA and DIANet: exactly the official count. SE: the official count minus the last stage's SE layers,
    which the official Bottleneck builds and never runs (#cg-se-last-stage)."""
    shapes = official_gate_shapes(kind, depth)
    never_run = sum(torch.Size(shapes[k]).numel() for k in never_run_se_keys(depth)) if kind == 'se' else 0
    if kind == 'se':
        assert never_run == (depth - 2) // 9 * 2 * 256 * 16
    assert n_params(f'cifar_resnet{depth}_{SHORT[kind]}') == OFFICIAL_PARAMS[kind][depth] - never_run


def test_se_gates_only_the_stages_narrower_than_256():
    model = timm.create_model('cifar_resnet20_se', device='meta')
    gated = {name for name, m in model.named_modules() if isinstance(m, SEGate)}
    assert gated == {f'layer{s}.{i}.attn_pre' for s in (1, 2) for i in (0, 1)}


def test_eca_kernel_sizes_follow_the_official_rule():
    """k = 3 at 64 channels, 5 at 128 and 256 (the official `eca_layer` rule)."""
    model = timm.create_model('cifar_resnet20_eca', device='meta')
    kernels = {s: model.get_submodule(f'layer{s}.1.attn_pre').eca.conv.kernel_size[0] for s in (1, 2, 3)}
    assert kernels == {1: 3, 2: 5, 3: 5}


def test_eca_gate_equals_timm_eca_module():
    from timm.layers import EcaModule
    gate = EcaGate(128)
    timm_eca = EcaModule(128)
    timm_eca.load_state_dict(gate.eca.state_dict())
    x = torch.randn(2, 128, 5, 5)
    torch.testing.assert_close(gate(x, [])[0], timm_eca(x))
    assert gate(x[:0], [])[0].shape == (0, 128, 5, 5)  # where timm's `view(B, 1, -1)` cannot


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official forward (#cg-maths), conversion reports and refusals (#cg-conversion)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,depth', [('se', 20), ('eca', 20), ('dianet', 20), ('dianet', 56)])
def test_parity_with_official_forward_after_convert(kind, depth):
    official = materialize(official_gate_shapes(kind, depth), seed=depth)
    name = f'cifar_resnet{depth}_{SHORT[kind]}'
    ckpt = {'state_dict': {'module.' + k: v for k, v in official.items()}, 'epoch': 299}  # the trainer's file
    converted, report = convert_official_with_report(ckpt, name)
    assert report.family == kind
    model = timm.create_model(name).eval()
    model.load_state_dict(converted, strict=True)
    x = _x()
    with torch.no_grad():
        ours, ref = model(x), official_gate_forward(official, kind, depth, x)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_se_conversion_drops_and_reports_the_never_run_layers(caplog):
    official = materialize(official_gate_shapes('se', 20))
    with caplog.at_level('INFO', logger='timm_layerattn.convert'):
        converted, report = convert_official_with_report(official, 'cifar_resnet20_se')
    assert sorted(report.dropped) == sorted(never_run_se_keys(20)) and len(report.dropped) == 4
    assert all(k.startswith('layer3.') for k in report.dropped)
    assert 'layer3.0.se.fc.0.weight' in caplog.text and 'never run' in report.summary()
    assert not any('layer3' in k and 'attn_pre' in k for k in converted)


def test_timm_entry_point_loads_an_official_file_as_convert_does(tmp_path):
    """timm's `pretrained=True` path (the family's checkpoint filter) takes the same tensors as `convert_official`."""
    official = materialize(official_gate_shapes('se', 20))
    path = tmp_path / 'se20.pth'
    torch.save({'state_dict': {'module.' + k: v for k, v in official.items()}}, path)
    model = timm.create_model('cifar_resnet20_se', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = model.state_dict()
    converted = convert_official(official, 'cifar_resnet20_se')
    assert list(loaded) == list(converted)
    assert all(torch.equal(loaded[k], converted[k]) for k in converted)


def test_dianet_layout_is_told_apart_from_dla():
    """DIANet's official cells are named `lstm` like DLA's sharing units; its `ModuleList` blocks tell it apart."""
    shapes = official_gate_shapes('dianet', 20)
    assert detect_official_family({k: torch.empty(v, device='meta') for k, v in shapes.items()}) == 'dianet'


@pytest.mark.parametrize('source,target,match', [
    ('se', 'cifar_resnet20_eca', r"official se checkpoint, but 'cifar_resnet20_eca' is a eca model"),
    ('dianet', 'cifar_resnet20_se', r"official dianet checkpoint, but 'cifar_resnet20_se' is a se model"),
    ('plain', 'cifar_resnet20_dia', r"no dianet gate keys in this checkpoint, but 'cifar_resnet20_dia'"),
])
def test_convert_refuses_another_layout_in_one_line(source, target, match):
    if source == 'plain':
        sd = timm.create_model('cifar_resnet20', device='meta').state_dict()
    else:
        sd = {k: torch.empty(v, device='meta') for k, v in official_gate_shapes(source, 20).items()}
    with pytest.raises(UserError, match=match) as e:
        convert_official(sd, target)
    assert '\n' not in str(e.value)


def test_convert_refuses_another_depth_with_the_arch_to_use():
    sd = {k: torch.empty(v, device='meta') for k, v in official_gate_shapes('eca', 56).items()}
    with pytest.raises(UserError, match='6-6-6 blocks per stage'):
        convert_official(sd, 'cifar_resnet20_eca')


# ---------------------------------------------------------------------------------------------------------------
# DIANet's carried state (#cg-dianet)
# ---------------------------------------------------------------------------------------------------------------

def _dia_stage(depth: int = 20):
    torch.manual_seed(0)
    model = timm.create_model(f'cifar_resnet{depth}_dia').eval()
    with torch.no_grad():  # non-trivial cell biases, so that h and c move away from their start
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return model


def test_dianet_stage_starts_from_zero_state_whatever_came_before():
    model = _dia_stage()
    x = torch.randn(2, 64, 32, 32)
    stale = [torch.randn(2, 64), torch.randn(2, 64), torch.randn(3)]  # e.g. a previous stage's state
    with torch.no_grad():
        fresh, state = model.layer2(x, [], [])
        after, state2 = model.layer2(x, stale, [])
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert len(state) == len(state2) == 2 + 8  # h, c and the stage cell's weights
    assert isinstance(model.layer2.attn_in, DIACell) and state[0].shape == (2, 128)


def test_dianet_blocks_of_a_stage_step_one_shared_cell():
    """Block 1 reads the (h, c) that block 0 left, and both use the stage cell's weights (no copy per block)."""
    model = _dia_stage()
    stage = model.layer1
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        x, start = stage.attn_in(x, [], [])
        assert all(w is p for w, p in zip(start[2:], stage.attn_in.parameters()))
        y0, after0 = stage.get_submodule('0')(x, start, [])
        assert not torch.equal(after0[0], start[0]) and all(a is b for a, b in zip(after0[2:], start[2:]))
        carried, _ = stage.get_submodule('1')(y0, after0, [])
        restarted, _ = stage.get_submodule('1')(y0, start, [])
    assert not torch.allclose(carried, restarted)
    assert sum(p.numel() for p in stage.get_submodule('1').attn_pre.parameters()) == 0


def test_dianet_grad_checkpointing_gives_the_same_gradients():
    """The cell's weights travel with the state through checkpointed units and still receive every gradient."""
    x = _x()
    grads = []
    for ckpt in (False, True):
        model = _dia_stage()
        model.train()
        model.set_grad_checkpointing(ckpt)
        model(x).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('build,exc,match', [
    (lambda: timm.create_model('cifar_resnet20_se', head_dim=16), ValueError,
     r'^cifar_resnet20_se: head_dim is only valid for models with layer attention, got 16$'),
    (lambda: timm.create_model('cifar_resnet20_dia', reduction=8), TypeError, 'reduction'),
    (lambda: timm.create_model('cifar_resnet20_eca', drop_path_rate=1.5), ValueError,
     r'drop_path_rate must be a probability in \[0, 1\), got 1.5'),
    (lambda: ChannelGates('cbam'), ValueError, r"^ChannelGates: kind must be one of \('se', 'eca', 'dia'\), got 'cbam'$"),
    (lambda: ChannelGates('se', reduction=0), ValueError, r'^ChannelGates: reduction must be a positive integer, got 0$'),
    (lambda: SEGate(8), ValueError, r'^SEGate: chs must be an integer >= 16 \(C // 16 channels in the squeeze\), got 8$'),
    (lambda: SEGate(64, reduction=2.0), TypeError, r'^SEGate: reduction must be a positive integer, got 2.0$'),
    (lambda: DIACell(2), ValueError, r'^DIACell: chs must be an integer >= 4 \(C // 4 '),
    (lambda: EcaGate(0), ValueError, r'^EcaGate: chs must be a positive integer, got 0$'),
])
def test_bad_arguments_fail_in_one_line(build, exc, match):
    with pytest.raises(exc, match=match) as e:
        build()
    assert '\n' not in str(e.value)
