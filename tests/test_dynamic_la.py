"""Dynamic layer attention (docs/design/dynamic_layer_attention.md): parameter counts against the official code,
parity of converted official checkpoints with the official forward (tests/_official_dynamic_la.py), the DSU's
state per stage, the memory-lean training paths against the plain one and float64, the shortcut refresh's kernel, the converter's report and refusals,
and the kwargs' errors."""
import copy
from typing import List

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn import convert_official
from timm_layerattn._utils.errors import UserError
from timm_layerattn.checkpoints.dynamic_la import RULES
from timm_layerattn.convert import convert_official_with_report
from timm_layerattn.layers import DynamicSharingUnit, lean, native
from timm_layerattn.layers.dynamic_la import DynamicLABase, DynamicLALight, ShortcutRefresh, refresh_shortcut

from _layer_attn import graph_nodes, randomize_norms
from _official import materialize, numel
from _official_dynamic_la import official_forward, official_shapes

# Parameter totals measured with the official code (CIFAR: 10 classes, bgx666/KCLA; ImageNet: tunantu's code).
OFFICIAL_PARAMS = {
    ('cifar', 'light', 20): 410_670, ('cifar', 'light', 56): 803_222, ('cifar', 'light', 110): 1_392_050,
    ('cifar', 'base', 20): 405_230, ('cifar', 'base', 56): 795_990, ('cifar', 'base', 110): 1_382_130,
    ('imagenet', 'light', 50): 28_581_812, ('imagenet', 'light', 101): 47_783_006,
}
BN2 = 512  # the KCLA repository's CIFAR DLA-light builds a BatchNorm2d(256) that never runs (dropped here)


def _name(variant: str, form: str, depth: int) -> str:
    return f'{"cifar_" if variant == "cifar" else ""}resnet{depth}_dynla{form[0]}'


@pytest.mark.parametrize('variant,form,depth', list(OFFICIAL_PARAMS), ids=lambda v: str(v))
def test_param_counts_match_official(variant, form, depth):
    total = OFFICIAL_PARAMS[(variant, form, depth)]
    assert numel(official_shapes(variant, form, depth)) == total  # pins the generated layout
    model = timm.create_model(_name(variant, form, depth), device='meta')
    dropped = BN2 if (variant, form) == ('cifar', 'light') else 0
    assert sum(p.numel() for p in model.parameters()) == total - dropped


def _official(variant, form, depth, kcla_repo=True):
    return materialize(official_shapes(variant, form, depth, kcla_repo=kcla_repo), seed=3)


@pytest.mark.parametrize('variant,form,depth,size', [
    ('cifar', 'light', 20, 32), ('cifar', 'base', 20, 32), ('imagenet', 'light', 50, 64)])
def test_converted_official_matches_official_forward(variant, form, depth, size):
    """Default arguments, float32 (the fused kernels where they apply): each sample equals the official network
    run on it alone (the official batch of one)."""
    official = _official(variant, form, depth)
    name = _name(variant, form, depth)
    model = timm.create_model(name).eval()
    model.load_state_dict(convert_official({'state_dict': official}, name), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    ref = torch.cat([official_forward(official, variant, form, depth, x[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize('form', ['light', 'base'])
def test_batch_coupled_gate_reproduces_the_official_batch(form):
    """float64 (tight): `batch_coupled_gate=True` is the official batched forward (the gate step reads sample 0's
    DSU state), the default is the per-sample one; the two differ far beyond the tolerance."""
    official = {k: v.double() if v.is_floating_point() else v for k, v in _official('cifar', form, 20).items()}
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    coupled_ref = official_forward(official, 'cifar', form, 20, x, batch_coupled=True)
    own_ref = official_forward(official, 'cifar', form, 20, x)
    sd = convert_official(official, f'cifar_resnet20_dynla{form[0]}')
    for coupled, ref in ((True, coupled_ref), (False, own_ref)):
        model = timm.create_model(f'cifar_resnet20_dynla{form[0]}', batch_coupled_gate=coupled).double().eval()
        model.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    assert (coupled_ref - own_ref).abs().max() > 1e-6
    torch.testing.assert_close(coupled_ref[:1], own_ref[:1], rtol=1e-12, atol=1e-12)  # sample 0 reads its own


def test_tunantu_cifar_copy_converts_with_head_dim_32():
    """tunantu's CIFAR DLA-light has no `bn2` and head dim 32 (a head dim sets no shape: it is passed)."""
    official = _official('cifar', 'light', 20, kcla_repo=False)
    sd, report = convert_official_with_report(official, 'cifar_resnet20_dynlal', head_dim=32)
    assert report.dropped == [] and report.family == 'dynamic_la_light'
    model = timm.create_model('cifar_resnet20_dynlal', head_dim=32).eval()
    model.load_state_dict(sd)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(official, 'cifar', 'light', 20, x, head_dim=32),
                                   rtol=1e-4, atol=1e-4)


def test_conversion_report_and_refusals():
    official = _official('cifar', 'light', 20)
    _, report = convert_official_with_report(official, 'cifar_resnet20_dynlal')
    assert report.family == 'dynamic_la_light'
    assert sorted(report.dropped) == sorted(k for k in official if k.startswith('bn2.'))
    with pytest.raises(UserError, match=r'official dynamic_la_light checkpoint.*dynamic_la_base model'):
        convert_official(official, 'cifar_resnet20_dynlab')
    with pytest.raises(UserError, match=r'official dynamic_la_base checkpoint.*mrla_base model'):
        convert_official(_official('cifar', 'base', 20), 'cifar_resnet20_mrlab')
    # a sharing unit of another hidden width: refused with the reduction to build the model with
    cfg = timm.create_model('cifar_resnet20_dynlal', device='meta', dsu_reduction=8).cfg
    with pytest.raises(UserError, match=r'reduction 4 .*uses 8.*dsu_reduction=4'):
        RULES['dynamic_la_light'].check_source(official, 'cifar_resnet20_dynlal', cfg)
    # timm's pretrained path (the family's checkpoint filter) renames through the same rules
    model = timm.create_model('cifar_resnet20_dynlab')
    model.load_state_dict(RULES['dynamic_la_base'].filter({'state_dict': _official('cifar', 'base', 20)}, model))


def test_dsu_state_restarts_every_stage():
    """The entry unit drops the previous stage's state and starts `[0, 0, *weights]` at the stage's width."""
    model = timm.create_model('cifar_resnet20_dynlab').eval()
    unit = model.layer2.attn_in
    assert isinstance(unit, DynamicSharingUnit)
    x = torch.randn(2, 64, 8, 8)
    stale = [torch.randn(2, 64)] * 13 + [torch.randn(2, 64, 8, 8)]
    out, state = unit(x, stale, [])
    assert out is x and len(state) == 10
    assert state[0].shape == (2, 128) and not state[0].any() and not state[1].any()
    assert all(a is b for a, b in zip(state[2:], unit.weights()))
    # the second stage's output depends on the first stage's output only, not on its DSU state: a network whose
    # first-stage DSU differs gives the same layer2 output for the same layer1 output
    with torch.no_grad():
        img = torch.randn(2, 3, 16, 16)
        feats = model.forward_intermediates(img, indices=[1, 2], intermediates_only=True)
        y, state = model.layer2(feats[0].clone(), [torch.full((2, 64), 5.)] * 10, [])
    torch.testing.assert_close(y, feats[1])


LEAN_NODES = ('BlockTailBackward', 'MRLALightBranchBackward', 'MRLABaseBranchBackward', 'ShortcutRefreshBackward')


def _lean_nodes(out: torch.Tensor) -> List[str]:
    return sorted(type(n).__name__ for n in graph_nodes(out) if type(n).__name__ in LEAN_NODES)


def _step(model: torch.nn.Module, x: torch.Tensor):
    """Output, parameter gradients and buffers after one step of `model` on `x` (drop path drawn from seed 1)."""
    torch.manual_seed(1)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


@pytest.mark.parametrize('name', ['cifar_resnet20_dynlal', 'cifar_resnet20_dynlab'])
@pytest.mark.parametrize('mode', ['train', 'train_drop_path', 'eval-grad'])
def test_lean_path_equals_plain_path(name, mode):
    """Both forms hand their block tail to MRLA's memory-lean autograd Functions (DLA-light with its refreshed
    shortcut as the map lambda scales): in float64 (PyTorch ops inside the Functions) the same outputs, gradients,
    running statistics and drop-path draws as the plain tail and module path, with every block on the lean path."""
    drop = 0.3 if mode == 'train_drop_path' else 0.
    model = randomize_norms(timm.create_model(name, drop_path_rate=drop)).double().train(mode != 'eval-grad')
    x = torch.randn(3, 3, 16, 12, dtype=torch.float64)
    with lean.forced():
        nodes = _lean_nodes(copy.deepcopy(model)(x))
        got = _step(copy.deepcopy(model), x)
    with lean.disabled():
        ref = _step(model, x)
    blocks = sum(isinstance(m, (DynamicLALight, DynamicLABase)) for m in model.modules())
    branch = 'MRLALightBranchBackward' if name.endswith('dynlal') else 'MRLABaseBranchBackward'
    assert nodes.count('BlockTailBackward') == blocks and nodes.count(branch) == blocks, nodes
    torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    scale = max(float(g.abs().max()) for g in ref[1].values())  # some gradients are zero but for rounding
    for n, g in ref[1].items():
        torch.testing.assert_close(got[1][n], g, rtol=1e-9, atol=1e-10 * scale, msg=n)
    for n, b in ref[2].items():
        torch.testing.assert_close(got[2][n], b, msg=n)


@pytest.mark.parametrize('name', ['cifar_resnet20_dynlal', 'cifar_resnet20_dynlab'])
def test_fused_training_step_matches_float64(ops, name):
    """Float32 with the fused kernels (the default): one training step as close to the float64 result as the plain
    float32 path is, with DLA-light's shortcut refresh on its own kernel in every block."""
    model = randomize_norms(timm.create_model(name)).train()
    x = torch.randn(3, 3, 32, 32)
    with lean.disabled():
        truth = _step(copy.deepcopy(model).double(), x.double())
        plain = _step(copy.deepcopy(model), x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = _step(copy.deepcopy(model), x)
    calls = {e.key: e.count for e in prof.key_averages()}
    blocks = sum(isinstance(m, (DynamicLALight, DynamicLABase)) for m in model.modules())
    assert calls.get('timm_layerattn::tail_forward') == blocks
    refresh = blocks if name.endswith('dynlal') else None
    assert calls.get('timm_layerattn::dw_scale_add') == refresh
    assert calls.get('timm_layerattn::dw_scale_add_backward') == refresh

    def error(step) -> float:
        out = ((step[0] - truth[0].float()).abs().max() / truth[0].abs().max()).item()
        scale = max(g.abs().max().item() for g in truth[1].values())
        return max(out, max((step[1][n] - g.float()).abs().max().item() for n, g in truth[1].items()) / scale)
    assert error(got) <= max(2e-5, 3 * error(plain)), (error(got), error(plain))


def test_shortcut_refresh_kernel(ops):
    """`r * gate + DW3(r)` and its gradients on the fused kernel equal the float64 PyTorch ops, in training (the
    Function) and inference (the module path); gradient-of-gradient replays the PyTorch maths."""
    g = torch.Generator().manual_seed(0)
    r, gate, w = torch.randn(3, 5, 7, 4, generator=g), torch.rand(3, 5, generator=g), torch.randn(5, 1, 3, 3, generator=g)
    grad = torch.randn(3, 5, 7, 4, generator=g)
    leaves = [t.clone().requires_grad_() for t in (r, gate, w)]
    out = ShortcutRefresh.apply(*leaves)
    got = [out] + list(torch.autograd.grad(out, leaves, grad))
    leaves64 = [t.double().requires_grad_() for t in (r, gate, w)]
    with native.disabled():
        out64 = refresh_shortcut(*leaves64)
    ref = [out64] + list(torch.autograd.grad(out64, leaves64, grad.double()))

    def penalty(fn, leaves):  # a gradient penalty: the backward's own gradient (the replayed PyTorch maths)
        grads = torch.autograd.grad((fn(*leaves) * grad.to(leaves[0].dtype)).sum(), leaves, create_graph=True)
        return list(torch.autograd.grad(sum(gr.square().sum() for gr in grads), leaves))
    got += penalty(ShortcutRefresh.apply, leaves)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got.append(refresh_shortcut(r, gate, w))  # the module path in inference: the same op
    assert {e.key: e.count for e in prof.key_averages()}.get('timm_layerattn::dw_scale_add') == 1
    with native.disabled():
        ref += penalty(refresh_shortcut, leaves64)
    ref.append(ref[0])
    for a, b in zip(got, ref):
        a, b = a.detach().double(), b.detach()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    with pytest.raises(RuntimeError, match='m must have shape'):
        ops.dw_scale_add(r, torch.ones(3, 4), w)
    with pytest.raises(RuntimeError, match='grad must have shape'):
        ops.dw_scale_add_backward(grad[:, :, :6], r, gate, w)


def test_batch_members_are_independent_by_default():
    model = timm.create_model('cifar_resnet20_dynlal').eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs,exc,message', [
    (dict(head_dim=7), ValueError, r"^cifar_resnet20_dynlal: head_dim must be one of 1, 2, 4, 8, 16, 32, 64 "),
    (dict(dsu_reduction=0), ValueError, r'^cifar_resnet20_dynlal: dsu_reduction must be a positive integer'),
    (dict(dsu_reduction=65), ValueError, r'^cifar_resnet20_dynlal: dsu_reduction must be .* at most 64'),
    (dict(batch_coupled_gate='yes'), TypeError, r"^cifar_resnet20_dynlal: batch_coupled_gate must be True or False"),
    (dict(rebuild_blocks=(0,)), TypeError, r'rebuild_blocks'),
])
def test_bad_kwargs(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        timm.create_model('cifar_resnet20_dynlal', **kwargs)
