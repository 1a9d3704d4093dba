"""SE / ECA / DIANet CIFAR baselines: parameter counts against the official code, parity with the official forward
after `convert_official` (tests/_official_gates.py), DIANet's carried state, the converter's reports and refusals,
and argument errors. The `#cg-...` anchors are sections of docs/design/channel_gates.md."""
import contextlib
import copy

import pytest
import timm
import torch

from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.convert import convert_official_with_report, detect_official_family
from timm_layerattn.layers import lean, native
from timm_layerattn.layers.gates import DIACell, DIAGate, EcaGate, SEGate
from timm_layerattn.models.cifar_resnet_gates import ChannelGates
from timm_layerattn.tools.bench import activation_bytes

from _layer_attn import assert_close_scaled, graph_nodes, randomize_norms
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
# The fused tail (#cg-fused-tail): last BatchNorm, gate, residual add and ReLU on the CPU kernels
# ---------------------------------------------------------------------------------------------------------------

GATED = ['cifar_resnet20_se', 'cifar_resnet20_eca', 'cifar_resnet20_dia']


def _step(model: torch.nn.Module, x: torch.Tensor):
    """Output, input and parameter gradients of a fixed loss, and the state dict (running statistics), float64."""
    torch.manual_seed(3)  # drop path draws
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), x.grad.double(), grads, {k: v.double() for k, v in model.state_dict().items()}


def _error(a, b) -> float:
    """Largest error of a `_step` against `b`: output and input gradient on their scales, parameter gradients on
    the scale of all of them, running statistics absolute."""
    err = max(((a[i] - b[i]).abs().max() / b[i].abs().max()).item() for i in (0, 1))
    assert a[2].keys() == b[2].keys()
    scale = max(g.abs().max().item() for g in b[2].values())
    err = max(err, max((a[2][k] - b[2][k]).abs().max().item() for k in b[2]) / scale)
    return max(err, max((a[3][k] - b[3][k]).abs().max().item() for k in b[3]))


def _node_names(out: torch.Tensor):
    return {type(n).__name__ for n in graph_nodes(out)}


def _gated_model(name: str, drop_path: float = 0.) -> torch.nn.Module:
    model = randomize_norms(timm.create_model(name, drop_path_rate=drop_path))
    with torch.no_grad():  # DIANet: non-trivial cell biases, so that h and c move away from their start
        for n, p in model.named_parameters():
            if p.ndim == 1 and 'attn_in' in n:
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize('name', GATED)
@pytest.mark.parametrize('mode', ['train', 'train_drop_path', 'frozen_norms'])
def test_fused_tail_training_matches_float64_truth(ops, name, mode):
    """The fused tail in float32 is as close to the float64 plain path as the plain float32 path is: outputs,
    input and parameter gradients (the gate's, DIANet's cell through the carried state), running statistics."""
    model = _gated_model(name, 0.2 if mode == 'train_drop_path' else 0.).train()
    if mode == 'frozen_norms':  # detection-style: every BatchNorm on its running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    x = torch.randn(3, 3, 16, 16)
    with lean.disabled(), native.disabled():
        truth = _step(copy.deepcopy(model).double(), x.double())
        plain = _error(_step(copy.deepcopy(model), x), truth)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused = _error(_step(copy.deepcopy(model), x), truth)
    calls = {e.key: e.count for e in prof.key_averages()}
    gates = sum(isinstance(m, (SEGate, EcaGate, DIAGate)) for m in model.modules())
    assert calls.get('timm_layerattn::tail_grad_sums') == calls.get('timm_layerattn::norm_backward_planes') == gates
    assert fused <= max(2e-5, 3 * plain), f'fused tail: error {fused:.3g}, plain float32 path {plain:.3g}'


@pytest.mark.parametrize('name', GATED)
def test_fused_tail_inference_equals_the_modules(ops, name):
    """Inference (eval, autograd off) runs the fused tail and gives the modules' output."""
    model = _gated_model(name).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = model(x)
    with torch.no_grad(), native.disabled():
        ref = model(x)
    assert {e.key: e.count for e in prof.key_averages()}.get('timm_layerattn::tail_forward', 0) > 0
    assert_close_scaled(got, ref, 1e-5)


@pytest.mark.parametrize('name', GATED)
def test_fused_tail_second_derivatives_equal_the_plain_path(ops, name):
    """A gradient penalty (`create_graph=True`) replays `GatedTail`'s reference maths: the same parameter
    gradients as the plain path."""
    model = _gated_model(name).train()
    out = []
    for context in (contextlib.nullcontext, native.disabled):
        m = copy.deepcopy(model)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        with context():
            y = m(x)
            assert ('GatedTailBackward' in _node_names(y)) == (context is contextlib.nullcontext)
            g, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
            g.square().sum().backward()
        out.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert_close_scaled(out[0], out[1], 1e-4)


@pytest.mark.parametrize('name', GATED)
def test_fused_tail_keeps_less_for_backward_and_nothing_on_ctx(ops, name):
    """Autograd keeps fewer bytes than with the modules (the normalised branch of each gated block is not kept:
    about 0.89x at this size), and only in `ctx.saved_tensors`."""
    model = timm.create_model(name).train()
    x = torch.randn(4, 3, 32, 32)
    fused = activation_bytes(model, x)
    with lean.disabled():
        plain = activation_bytes(model, x)
    assert fused < 0.93 * plain, (fused, plain)
    nodes = [n for n in graph_nodes(model(x)) if type(n).__name__ == 'GatedTailBackward']
    assert nodes
    for node in nodes:
        assert not any(isinstance(v, torch.Tensor) for v in vars(node).values())


def test_fused_tail_is_off_where_the_kernels_cannot_run(ops):
    """channels_last maps, float64 and `TIMM_LAYERATTN_LEAN=0` keep the modules (and their results)."""
    model = _gated_model('cifar_resnet20_se').train()
    x = torch.randn(2, 3, 16, 16)
    assert 'GatedTailBackward' in _node_names(model(x))
    assert 'GatedTailBackward' not in _node_names(copy.deepcopy(model).double()(x.double()))
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert 'GatedTailBackward' not in _node_names(cl(x.contiguous(memory_format=torch.channels_last)))
    with lean.disabled():
        assert 'GatedTailBackward' not in _node_names(model(x))


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
