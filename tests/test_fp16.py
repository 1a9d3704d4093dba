"""float16 autocast (the default of GPU AMP): finite outputs and gradients wherever the plain ResNet is finite.

The per-channel attention maths (query-key dot products, key norms, softmax logits) runs in float32 under half
precision (`timm_layerattn.layers._common.accumulation_dtype`); in float16 those sums overflow as soon as the
pooled features reach a few hundred, and KCLA's key-norm epsilon (1e-12) rounds to zero, so an all-zero image
gave 0 / 0. CPU autocast runs here; the same code paths run under CUDA autocast.
"""
import contextlib

import pytest
import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers import KCLA, MRLABase, MRLALight, lean

INPUTS = ('zero', 'random', 'random_x300')


def _input(kind: str, size: int) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {'zero': torch.zeros_like(x), 'random': x, 'random_x300': x * 300}[kind]


def _fp16_step(model: torch.nn.Module, x: torch.Tensor, train: bool):
    """(outputs finite, gradients finite) of one forward + backward under float16 autocast."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.float16):
        out = model(x)
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, 'no gradient reached the parameters'
    return bool(torch.isfinite(out).all()), all(bool(torch.isfinite(g).all()) for g in grads)


def _calibrate_norms(model: torch.nn.Module, size: int) -> None:
    """BatchNorm statistics of the inputs, as a trained model has them (with the init statistics, mean 0 and
    var 1, an eval-mode network does not normalise at all)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(_input('random', size))


def _peak_activation(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest magnitude of any module output of a float32 forward."""
    peak = [0.]

    def hook(module, inputs, output):
        for o in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel():
                peak[0] = max(peak[0], float(o.detach().abs().max()))
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return peak[0]


MODELS = [
    ('resnet50_kcla', 'resnet50', 64),
    ('resnet50_mrlal', 'resnet50', 64),
    ('resnet50_mrlab', 'resnet50', 64),
    ('cifar_resnet20_kcla', 'cifar_resnet20', 32),
    ('cifar_resnet56_mrlal', 'cifar_resnet56', 32),
    ('cifar_resnet56_mrlab', 'cifar_resnet56', 32),
]


@pytest.mark.parametrize('name,baseline,size', MODELS)
def test_fp16_autocast_training_step_finite_where_resnet_is(name, baseline, size):
    """What AMP training runs: train-mode forward + backward under float16 autocast, on the path CPU autocast takes
    by default (plain autograd) and on the memory-lean Functions GPUs take (`lean.forced()` here)."""
    torch.manual_seed(0)
    model, reference = timm.create_model(name), timm.create_model(baseline)
    for kind in INPUTS:
        x = _input(kind, size)
        expected = _fp16_step(reference, x, train=True)
        assert all(expected), f'{baseline} itself is not finite on {kind}: the check would prove nothing'
        for path, context in (('default', contextlib.nullcontext), ('lean', lean.forced)):
            with context():
                got = _fp16_step(model, x, train=True)
            assert all(got), (f'{name} ({kind}, {path} path): finite (outputs, gradients) {got} under fp16 autocast, '
                              f'{baseline} {expected}')


@pytest.mark.parametrize('name,baseline,size', [m for m in MODELS if m[0] != 'resnet50_mrlal'])
def test_fp16_autocast_eval_finite_wherever_activations_fit_fp16(name, baseline, size):
    """Eval mode: float16 may only fail where the float32 network's own activations leave float16's range
    (a 300x input does that for some of them, as it does for deeper plain ResNets); the attention maths
    itself must never overflow."""
    torch.manual_seed(0)
    model = timm.create_model(name)
    _calibrate_norms(model, size)
    checked = []
    for kind in INPUTS:
        x = _input(kind, size)
        model.eval()
        if _peak_activation(model, x) > 16384:  # headroom below float16's 65504 for rounding and the sums
            continue
        got = _fp16_step(model, x, train=False)
        assert all(got), f'{name} ({kind}, eval): finite (outputs, gradients) {got} under fp16 autocast'
        checked.append(kind)
    assert {'zero', 'random'} <= set(checked), checked


@pytest.mark.parametrize('cell', [
    lambda: KCLA(64, head_dim=16),
    lambda: MRLALight(64, head_dim=16),
    lambda: MRLABase(64, head_dim=16),
], ids=['kcla', 'mrla_light', 'mrla_base'])
@pytest.mark.parametrize('mode', ['train', 'eval_grad', 'eval_no_grad'])
def test_large_pooled_features_do_not_overflow_half_scores(cell, mode):
    """Pooled features of ~1000 give query-key products of ~1e6 (float16 overflows at 65504, and a sum of
    +inf and -inf is NaN): every path (reference, folded, folded without autograd) must still match the float32
    result to float16 accuracy, and the carried sums must stay float32."""
    torch.manual_seed(0)
    module = cell().train(mode == 'train')
    x = torch.rand(2, 64, 6, 6) * 2000
    shortcut = torch.rand(2, 64, 6, 6)

    def two_blocks(x, shortcut):
        out, state = module(x.clone(), shortcut, [])
        out, state = module(out.clone(), shortcut, state)
        return out, state

    with torch.set_grad_enabled(mode != 'eval_no_grad'):
        ref, _ = two_blocks(x, shortcut)
        with torch.autocast('cpu', dtype=torch.float16):  # features arrive in float16, as from a conv
            out, state = two_blocks(x.half(), shortcut.half())
    # KCLA's history and weight sums and MRLA-base's cached keys stay float32 (MRLA-base values: feature dtype).
    assert all(s.dtype == torch.float32 for s in state if s.dim() < 4 or isinstance(module, KCLA))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.detach(), rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
