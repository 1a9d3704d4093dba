"""What the layer-attention families share (docs/design/layer_attention.md): the ECA kernel size, the plain
trunk against tests/_reference.py, and the `LayerAttnBase` paths (reference / folded, their dispatch, eval-mode
autograd, inference mode) on every family's chain. Each family's own maths, kernels, parameter counts and
official checkpoints are in tests/test_kcla.py and tests/test_mrla.py."""
import functools

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, LayerAttnBase, MRLABase, MRLALight, eca_kernel_size
from timm_layerattn.layers import native

from _layer_attn import (
    CHAINS, assert_close_scaled, assert_same_step, check_reference_network, layer_attn_chain, randomize_norms,
    record_paths, run_path)


def test_eca_kernel_sizes_match_spec_table():
    expected = {16: 3, 32: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    assert {c: eca_kernel_size(c) for c in expected} == expected


@pytest.mark.parametrize('name,size', [
    ('cifar_resnet20', 16),
])
@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_model_matches_reference_network(name, size, training):
    """Whole-network wiring: stem, strides, where history is re-summarised, cache resets per stage.

    float64, so that batch-statistics BN over tiny late-stage maps does not amplify rounding noise.
    """
    check_reference_network(name, size, training)


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab'])
def test_eval_mode_backward_matches_unfolded_path(name, monkeypatch):
    """Eval mode with autograd (e.g. saliency maps) differentiates the folded-BN path correctly."""
    from timm_layerattn.layers import LayerAttnBase
    model = randomize_norms(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(LayerAttnBase, '_can_fold_norm', lambda self: False)
    model(x).square().sum().backward()
    ref = [x.grad] + [p.grad for p in model.parameters()]
    for g, r in zip(grads, ref):
        assert_close_scaled(g, r, tol=1e-4)


@pytest.mark.parametrize('name', ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab'])
def test_inference_mode_matches_grad_mode(name):
    """The no-autograd path (in-place buffer reuse) computes the same values."""
    model = randomize_norms(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_chunked_depthwise_conv_equals_single_call():
    """Large CPU inputs go through the batch-chunked path; values and gradients are unchanged."""
    from timm_layerattn.layers._common import depthwise_conv3x3
    x = torch.randn(5, 8, 20, 20, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    ref = torch.nn.functional.conv2d(x, w, padding=1, groups=8)
    out = depthwise_conv3x3(x, w, split_above=1000, chunk=2000)  # forces chunks of 2 samples
    torch.testing.assert_close(out, ref)
    (gx, gw), (rx, rw) = torch.autograd.grad(out.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)  # summed over chunks: order differs
    xc = x.detach().contiguous(memory_format=torch.channels_last)  # not split: already fast
    torch.testing.assert_close(depthwise_conv3x3(xc, w, split_above=1000, chunk=2000), ref)


@pytest.mark.parametrize('kind', CHAINS)
def test_eval_paths_agree(kind):
    """In eval mode the folded path, with autograd off (in place) and on, equals the reference path (which
    applies the eval-mode BatchNorm as a module), in output and carried state, block by block."""
    state = []
    for mod, x, r in layer_attn_chain(kind):
        ref = run_path(mod, 'reference', x, r, state)
        assert_same_step(run_path(mod, 'folded', x, r, state), ref)
        assert_same_step(run_path(mod, 'folded', x, r, state, grad=True), ref)
        state = ref[1]


def test_forward_is_defined_once_in_the_base():
    """`LayerAttnBase.forward` is the one dispatch point: the strategies implement only the paths."""
    for cls in (KCLA, MRLALight, MRLABase):
        assert [k for k in cls.__mro__ if 'forward' in vars(k)] == [LayerAttnBase, torch.nn.Module]
        assert all(f'forward_{p}' in vars(cls) for p in ('reference', 'folded', 'native'))


@pytest.mark.parametrize('kind', CHAINS)
def test_forward_dispatch_rule(kind):
    """Reference in training and for norms without running statistics, folded in eval (autograd on, or no
    fused kernel); the native cases are in test_native_kernels.py."""
    mod, x, r = layer_attn_chain(kind)[0]
    taken = record_paths(mod)
    mod(x.clone(), r, [])
    with torch.no_grad(), native.disabled():
        mod(x.clone(), r, [])
        mod.norm.train()  # a norm in batch-statistics mode cannot be folded
        mod(x.clone(), r, [])
        mod.train()
        mod(x.clone(), r, [])
    mod(x.clone(), r, [])
    assert taken == ['folded', 'folded', 'reference', 'reference', 'reference']
    no_stats = functools.partial(torch.nn.BatchNorm2d, track_running_stats=False)
    stateless = type(mod)(mod.channels, head_dim=mod.head_dim, norm_layer=no_stats).eval()
    taken = record_paths(stateless)
    with torch.no_grad():
        stateless(x.clone(), r, [])
    assert taken == ['reference']
