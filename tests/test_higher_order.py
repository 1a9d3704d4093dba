"""Higher-order autograd and `torch.func` through the fast paths: the memory-lean autograd Functions and the fused
CPU kernels give what the plain PyTorch-ops path gives, or hand over to it, and never a silently wrong number.

* Double backward: each Function's backward replays its PyTorch-ops `reference` when a graph of the gradient
  is built (`lean.replay`). `gradgradcheck` in float64 holds the tail and every branch, chained as in a block;
  HVPs, Hessians and gradient penalties through whole models equal the plain path's, with the fused kernels on
  (float32) and with PyTorch ops (float64).
* `torch.func` and forward-mode AD: the Functions and fused ops step aside (`native.transforms_active`), so
  `grad`, `jacrev`, `vmap` (per-sample gradients), `jvp` and `forward_ad` work on every family and equal
  plain autograd; a backward that functorch batches (`jacobian(vectorize=True)`) replays as well.
"""
import contextlib
import copy

import pytest
import timm
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import lean, native
from timm_layerattn.layers.kcla import KCLABranch
from timm_layerattn.layers.lean import BlockTail, ChannelConv
from timm_layerattn.layers.mrla import MRLABaseBranch, MRLALightBranch

from _layer_attn import assert_close_scaled, graph_nodes, randomize_norms
from _model_lists import REPRESENTATIVES

CIFAR_LA = ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab']


@contextlib.contextmanager
def plain_path():
    """The plain-ops path the fast paths are held to: no lean Functions, no fused kernels."""
    with lean.disabled(), native.disabled():
        yield


def fast_path(dtype: torch.dtype):
    """float32: the default path (lean Functions on the fused kernels); float64: the lean Functions on PyTorch ops
    (the kernels are float32-only, and 'auto' keeps plain autograd on CPU without them)."""
    return lean.forced() if dtype == torch.float64 else contextlib.nullcontext()


def _model(name: str, dtype: torch.dtype, training: bool, **kwargs) -> torch.nn.Module:
    """`name` with random norm parameters and statistics, or, where those make its output overflow (a net without
    a normaliser: linear layer attention, as official), its own (finite) init."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    randomized = randomize_norms(copy.deepcopy(model)).eval()
    with torch.no_grad():
        finite = bool(torch.isfinite(randomized(_input(torch.float32, size=32))).all())
    return (randomized if finite else model).to(dtype).train(training)


def _input(dtype: torch.dtype, batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _both(model: torch.nn.Module, dtype: torch.dtype, fn):
    """`fn(model)` on the fast path and, on a copy, the plain path, with the same RNG (drop path) and BatchNorm
    statistics at the start."""
    results = []
    for context in (fast_path(dtype), plain_path()):
        m = copy.deepcopy(model)
        torch.manual_seed(7)
        with context:
            results.append(fn(m))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Double backward of each Function, float64
# ---------------------------------------------------------------------------------------------------------------


def _bn(c: int, training: bool, seed: int) -> torch.nn.BatchNorm2d:
    return randomize_norms(torch.nn.BatchNorm2d(c), seed=seed).double().train(training)


def _leaf(shape, seed: int, low: float = None) -> torch.Tensor:
    t = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = t * 0.8 + 0.1 if low is not None else t * 2 - 1
    return t.requires_grad_()


@pytest.mark.parametrize('training', [True, False], ids=['batch_stats', 'running_stats'])
@pytest.mark.parametrize('function', ['tail', 'kcla', 'kcla_first', 'mrla_light', 'mrla_base', 'mrla_base_first'])
def test_gradgradcheck_float64(function, training):
    """`gradcheck` and `gradgradcheck` of the tail alone and of each branch on the tail's outputs (the branch
    recomputes `x` from the tail's `pre`, `shortcut`, `scale`, `shift`, so its second derivative reaches the
    network through them), with drop path, batch and running statistics."""
    B, C, H, W = 3, 4, 3, 4
    keep = torch.tensor([1.5, 0., 0.8], dtype=torch.float64)
    norm3, norm = _bn(C, training, 1), _bn(C, training, 2)
    pre, shortcut = _leaf((B, C, H, W), 1), _leaf((B, C, H, W), 2)
    v_weight = _leaf((C, 1, 3, 3), 3)
    tail_args = (pre, shortcut, norm3.weight, norm3.bias)

    def tail(p, s, w, b):
        return BlockTail.apply(p, s, w, b, norm3, keep)

    if function == 'tail':
        def fn(p, s, w, b):
            return tail(p, s, w, b)[:2]
        args = tail_args
    elif function.startswith('kcla'):
        hist = None if function == 'kcla_first' else _leaf((B, C, H, W), 4)
        weight, gate = _leaf((B, C), 5, low=0.1), _leaf((B, C), 6, low=0.1)

        def fn(p, s, w, b, h, lw, g, v, nw, nb):
            x, _, scale, shift = tail(p, s, w, b)
            return KCLABranch.apply(x, p, s, scale, shift, h, lw, g, v, nw, nb, norm, keep)
        args = tail_args + (hist, weight, gate, v_weight, norm.weight, norm.bias)
    elif function == 'mrla_light':
        def fn(p, s, w, b, g, v, lam, nw, nb):
            x, _, scale, shift = tail(p, s, w, b)
            return MRLALightBranch.apply(x, p, s, scale, shift, g, v, lam, nw, nb, norm, keep)
        args = tail_args + (_leaf((B, C), 5, low=0.1), v_weight, _leaf((C, 1, 1), 6), norm.weight, norm.bias)
    else:
        earlier = [] if function == 'mrla_base_first' else [_leaf((B, C, H, W), 7 + j) for j in range(2)]
        weights = _leaf((B, len(earlier) + 1, C), 5, low=0.1)

        def fn(p, s, w, b, ws, v, nw, nb, *values):
            x, _, scale, shift = tail(p, s, w, b)
            return MRLABaseBranch.apply(x, p, s, scale, shift, ws, v, nw, nb, norm, keep, *values)
        args = tail_args + (weights, v_weight, norm.weight, norm.bias, *earlier)
    with native.disabled(), lean.forced():
        assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
        assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not native.available(), reason='fused CPU kernels unavailable')
def test_channel_conv_double_backward_equals_conv1d():
    """The fused ECA channel conv (float32 only) has the second derivative of `F.conv1d`."""
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(3, 16, generator=g).requires_grad_()
    weight = torch.randn(2, 1, 3, generator=g).requires_grad_()
    probe = torch.randn(3, 2, 16, generator=g)

    def second(conv):
        out = conv(pooled, weight)
        gp, gw = torch.autograd.grad((out.square() * probe).sum(), (pooled, weight), create_graph=True)
        return torch.autograd.grad(gp.square().sum() + gw.square().sum(), (pooled, weight))

    with lean.forced():
        got = second(ChannelConv.apply)
    want = second(lambda p, w: torch.nn.functional.conv1d(p.unsqueeze(1), w, None, 1, 1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Whole models: HVP, Hessian, gradient penalty
# ---------------------------------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-9}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['float32_kernels', 'float64_ops'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', CIFAR_LA)
def test_hvp_equals_plain_path(name, training, dtype):
    """`torch.autograd.functional.hvp` through the model (input direction) equals the plain path's, in train mode
    with drop path and in eval mode. Before the replay it was 0 in eval mode and far off in training."""
    model = _model(name, dtype, training, drop_path_rate=0.1)
    x, v = _input(dtype), _input(dtype).flip(0)

    def hvp(m):
        return torch.autograd.functional.hvp(lambda i: m(i).square().sum(), x, v)[1]
    got, want = _both(model, dtype, hvp)
    assert want.abs().max() > 0
    assert_close_scaled(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64], ids=['float32_kernels', 'float64_ops'])
@pytest.mark.parametrize('name', CIFAR_LA)
def test_gradient_penalty_equals_plain_path(name, dtype):
    """A gradient penalty (`autograd.grad(create_graph=True)`, then backward to the parameters) in training gives
    the plain path's parameter gradients; the lean Functions ran for the forward."""
    model = _model(name, dtype, True, drop_path_rate=0.1)
    x = _input(dtype)

    def penalised(m):
        inp = x.clone().requires_grad_()
        out = m(inp)
        if lean.mode() == 'on' or (lean.mode() == 'auto' and native.available()):  # the fast path, not the plain
            names = {type(n).__name__ for n in graph_nodes(out)}
            assert 'BlockTailBackward' in names, names
        (g,) = torch.autograd.grad(out.square().sum(), inp, create_graph=True)
        (out.sum() + g.square().sum()).backward()
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    got, want = _both(model, dtype, penalised)
    assert got.keys() == want.keys()
    scale = max(w.abs().max().item() for w in want.values())
    for k in want:
        err = (got[k] - want[k]).abs().max().item()
        assert err <= TOLERANCE[dtype] * scale, f'{k}: {err:.3g} > {TOLERANCE[dtype]:g} x {scale:.3g}'


@pytest.mark.parametrize('name', CIFAR_LA)
def test_hessian_and_vectorized_jacobian_equal_plain_path(name):
    """`hessian` (double backward, the second one batched by functorch) and `jacobian(vectorize=True)` on the
    lean Functions, float64, train mode."""
    model = _model(name, torch.float64, True)
    x = _input(torch.float64, batch=2, size=4)

    def both(m):
        hess = torch.autograd.functional.hessian(lambda i: m(i).square().sum(), x, vectorize=True)
        jac = torch.autograd.functional.jacobian(m, x, vectorize=True)
        return hess, jac
    (h1, j1), (h2, j2) = _both(model, torch.float64, both)
    assert_close_scaled(h1, h2, 1e-9)
    assert_close_scaled(j1, j2, 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# torch.func and forward-mode AD, every family
# ---------------------------------------------------------------------------------------------------------------


def _functional(model: torch.nn.Module):
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).square().sum()
    return params, loss


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_per_sample_gradients_with_vmap_equal_autograd(name):
    """`vmap(grad(...))` per-sample parameter gradients (eval mode: BatchNorm with running statistics, as
    torch.func needs for any BatchNorm network) equal plain autograd sample by sample."""
    model = _model(name, torch.float32, False)
    x = _input(torch.float32, batch=3, size=32)
    params, loss = _functional(model)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    single = grad(loss)(params, x[1])
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        with plain_path():
            model(x[i:i + 1]).square().sum().backward()
        want = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
        scale = max(w.abs().max().item() for w in want.values())  # float32 rounding, on the scale of all grads
        for k, w in want.items():
            got = [per_sample[k][i]] + ([single[k]] if i == 1 else [])
            for g in got:
                err = (g - w).abs().max().item()
                assert err <= 1e-5 * scale, f"{k}, sample {i}: {err:.3g} > 1e-5 x {scale:.3g}"


@pytest.mark.parametrize('name', REPRESENTATIVES)
def test_jacrev_jvp_and_batched_inference_equal_the_default_path(name):
    """`jacrev` and `jvp` in the input equal the autograd Jacobian (lean path, eval mode) and `forward_ad`;
    `vmap` over samples without autograd equals the batched eager forward (the fused inference ops)."""
    model = _model(name, torch.float32, False)
    x = _input(torch.float32, batch=2, size=32)
    tangent = _input(torch.float32, batch=2, size=32).flip(0)
    jac = torch.autograd.functional.jacobian(model, x)  # [B, K, B, 3, H, W]
    jac_func = jacrev(model)(x)
    torch.testing.assert_close(jac_func, jac, rtol=1e-4, atol=1e-5)
    _, jvp_out = jvp(model, (x,), (tangent,))
    want = torch.einsum('bkcdhw,cdhw->bk', jac, tangent)
    torch.testing.assert_close(jvp_out, want, rtol=1e-4, atol=1e-5)
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        fw = fwad.unpack_dual(model(fwad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(fw, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        batched = model(x)
        mapped = vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(mapped, batched, rtol=1e-4, atol=1e-5)


def test_functorch_and_forward_ad_turn_the_fast_paths_off():
    """`native.transforms_active` is the one rule, read by both switches."""
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    assert not native.transforms_active()
    seen = []

    def probe(t):
        seen.append((native.transforms_active(), lean.usable(t, t)))
        return t.sum()
    grad(probe)(x.detach())
    vmap(probe)(x.detach())
    import torch.autograd.forward_ad as fwad
    with fwad.dual_level():
        probe(fwad.make_dual(x.detach(), torch.ones_like(x)))
    assert seen == [(True, False)] * 3
    with lean.forced():
        assert lean.usable(x, x)
