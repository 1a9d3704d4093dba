"""Memory-lean training path: a block's tail and its attention branch as autograd Functions.

With plain autograd, a layer-attention block keeps, besides what a ResNet block keeps, its post-ReLU
output `x` (the branch adds to it, so the block output is a second full-size map), the value map, the
BatchNorm input and the ReLU output of the branch: two to three extra full-size maps per block, about twice
`resnet50`'s activation memory for models that add ~2.5% FLOPs. Everything the branch computes at full size
is cheap to recompute from a few tensors the network holds anyway, so the Functions here keep only those:

* `BlockTail` takes over the block's last BatchNorm, its residual add and ReLU
  (`x = relu(bn3(pre) * keep + shortcut)`) and keeps `pre` (the BatchNorm keeps it anyway) and `shortcut`
  (the block input, kept by the first conv, for identity shortcuts), not `x`. It also returns the pooled
  descriptor of `x`, so the per-sample attention maths runs as plain autograd on `[B, C]` tensors.
* Each family's branch Function (`kcla.py`, `mrla.py`) takes `x` but keeps only the tail's recipe for it,
  the carried state it reads and per-channel vectors; backward recomputes `x`, the value map and the
  branch's BatchNorm input, then differentiates in one go.
* `GatedTail` is the tail of a block whose residual branch a channel gate scales before the add (SE, ECA,
  DIANet: `gates.py`), `x = relu(bn3(pre) * gate * keep + shortcut)`, the gate a function of the pooled
  `bn3(pre)`; it keeps `pre` and `shortcut` as `BlockTail` does, and runs on the fused kernels only.
* `NormReLU` is a block's inner BatchNorm and ReLU after its first convs (`relu(bn1(conv1(x)))`, every
  ResNet family, with or without attention), on the fused kernels only: two passes forward and two backward
  where the modules take three each, keeping the norm's input as BatchNorm does.

Train-mode BatchNorm is exact: batch statistics forward, running statistics updated once per forward as
`nn.BatchNorm2d` does (momentum or cumulative average, unbiased variance), the full batch-statistics
gradient backward; an eval-mode norm (e.g. frozen for detection) uses its running statistics. Drop path
draws its per-sample mask exactly as timm's `DropPath` (same RNG calls, same order), so a seeded run takes
the same path through the network either way.

`usable(...)` decides, per block, in eager mode with autograd on: TorchScript, tracing, fx, `torch.compile`
(whose partitioner recomputes on its own) and `torch.export` see the plain modules. On float32 contiguous
CPU tensors the Functions call the fused training kernels (`native`), faster than plain autograd and lean.
Elsewhere they run the same maths with PyTorch ops, which trades recomputation time for memory: the default
(`mode() == 'auto'`) takes that trade on accelerators, where activation memory bounds the batch, and keeps
plain autograd on CPU when the kernels cannot run (bfloat16 autocast, channels_last), where time matters
more. Device types that autocast does not know (the meta device, where timm and accelerate infer shapes)
keep the plain modules. `TIMM_LAYERATTN_LEAN=0` turns the path off, `=1` on wherever it can run;
`with lean.disabled():` and `with lean.forced():` do the same for a block of code (the tests compare the paths
that way).

Higher-order gradients are exact. Each Function states its maths once more as `reference`, in differentiable
PyTorch ops without side effects, and its backward differentiates that (`replay`) instead of running the fast
backward whenever the fast backward's result would be wrong: a graph of the gradient is being built
(`create_graph=True`: gradient penalties, `torch.autograd.functional.hvp` / `hessian`), functorch batches the
backward (`jacobian(vectorize=True)`), or gradients arrive for outputs the fast backward treats as constants
(the tail's `scale` / `shift`, which only a second derivative reaches). Under `torch.func` transforms and
forward-mode AD the Functions do not run at all (`native.transforms_active`): the plain modules do.
"""
import contextlib
import contextvars
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .._utils.env import env_switch
from . import native

__all__ = [
    'ENV', 'mode', 'active', 'usable', 'disabled', 'forced', 'drop_path_keep', 'norm_stats', 'fused_norm',
    'norm_affine', 'plane_affine', 'norm_backward', 'weight_or_ones', 'affine_grads', 'dense', 'per_sample',
    'tail_output', 'tail_reference', 'norm_reference', 'must_replay', 'replay', 'Tail', 'block_tail', 'BlockTail',
    'GatedTail', 'gated_tail', 'gated_tail_forward', 'ChannelConv', 'NormReLU', 'norm_relu', 'norm_relu_usable',
]

ENV = 'TIMM_LAYERATTN_LEAN'
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar('timm_layerattn_lean', default=None)


def mode() -> str:
    """'off', 'on' or 'auto' (default): `with disabled()` / `with forced()`, else `TIMM_LAYERATTN_LEAN`."""
    override = _override.get()
    return env_switch(ENV) if override is None else override


@contextlib.contextmanager
def _set_mode(value: str) -> Iterator[None]:
    token = _override.set(value)
    try:
        yield
    finally:
        _override.reset(token)


def disabled() -> contextlib.AbstractContextManager:
    """Use the plain-ops training path inside this block (this thread / task only)."""
    return _set_mode('off')


def forced() -> contextlib.AbstractContextManager:
    """Use the lean path inside this block wherever it can run, also on CPU without the fused kernels."""
    return _set_mode('on')


def active() -> bool:
    """True when the lean path may run now: eager mode with autograd on, not turned off, no `torch.func`
    transform or forward-mode AD (`native.transforms_active`)."""
    if not torch.is_grad_enabled() or mode() == 'off' or native.transforms_active():
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or _fx_tracing():
        return False
    return _get_current_dispatch_mode() is None  # FLOP counters, fake tensors: let them see aten ops


def _fx_tracing() -> bool:
    """Under `torch.fx` symbolic tracing (timm's and torchvision's feature extractors)."""
    trace = torch.fx._symbolic_trace
    is_tracing = getattr(trace, 'is_fx_symbolic_tracing', None) or getattr(trace, 'is_fx_tracing', None)
    return bool(is_tracing and is_tracing())


def _autocast_supported(device_type: str) -> bool:
    """Whether `torch.autocast` accepts `device_type`: the Functions turn autocast off inside, which fails on
    other device types, the meta device among them (timm, accelerate and smp run models there for shapes)."""
    if device_type == 'meta':
        return False
    check = getattr(torch.amp.autocast_mode, 'is_autocast_available', None)  # torch >= 2.4
    return True if check is None else bool(check(device_type))


def usable(*tensors: Optional[Tensor]) -> bool:
    """True when a block can run the lean Functions on these tensors now (`active()`), 4-D floating-point maps
    on one device that autocast supports (not the meta device), non-empty."""
    if not active():
        return False
    device = None
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch.fx.Proxy) or not t.is_floating_point():
            return False
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    first = tensors[0]
    if first is None or first.dim() != 4 or first.numel() == 0 or not _autocast_supported(first.device.type):
        return False
    # On CPU without the fused kernels plain autograd is faster; 'auto' keeps it there (see the module docstring).
    maps = [t for t in tensors if t is not None and t.dim() == 4]  # what the kernels read; small state is copied
    return first.device.type != 'cpu' or mode() == 'on' or native.trainable(*maps)


def drop_path_keep(module: Optional[nn.Module], like: Tensor) -> Optional[Tensor]:
    """The per-sample factor `[B]` timm's `DropPath` would multiply `like` by (drawn with the same RNG calls),
    or None where the module is the identity (absent, eval mode, rate 0)."""
    if not isinstance(module, DropPath) or not module.training or module.drop_prob == 0.:
        return None
    keep_prob = 1 - module.drop_prob
    keep = like.new_empty((like.shape[0],) + (1,) * (like.dim() - 1)).bernoulli_(keep_prob)
    if keep_prob > 0. and module.scale_by_keep:
        keep.div_(keep_prob)
    return keep.view(-1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _uses_batch_stats(norm: nn.BatchNorm2d) -> bool:
    return norm.training or norm.running_mean is None


def _running_factor(norm: nn.BatchNorm2d) -> float:
    """Count this forward in `num_batches_tracked` where `nn.BatchNorm2d.forward` would, and return the weight
    of the batch statistics in the running ones (momentum, or 1 / count for a cumulative average)."""
    factor = 0. if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1. / float(norm.num_batches_tracked)
    return factor


def _values_per_channel(norm: nn.BatchNorm2d, u: Tensor) -> int:
    n = u.numel() // u.shape[1]
    if norm.training and n <= 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(u.shape)}')
    return n


def norm_stats(norm: nn.BatchNorm2d, u: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel `(mean, invstd)` that `norm` applies to `u`, in float32 (float64 for float64 maps).

    Batch statistics in training (running statistics updated as `nn.BatchNorm2d.forward` does), running
    statistics otherwise.
    """
    acc = _acc_dtype(u)
    factor = _running_factor(norm)
    if not _uses_batch_stats(norm):
        return norm.running_mean.to(acc), torch.rsqrt(norm.running_var.to(acc) + norm.eps)
    n = _values_per_channel(norm, u)
    if u.is_cuda:
        mean, invstd = torch.batch_norm_stats(u, norm.eps)
        var = invstd.pow(-2) - norm.eps
    else:
        var, mean = torch.var_mean(u if u.dtype == acc else u.to(acc), dim=(0, 2, 3), correction=0)
    mean, var = mean.to(acc), var.to(acc)
    if norm.training and norm.running_mean is not None:
        with torch.no_grad():
            norm.running_mean.lerp_(mean.to(norm.running_mean.dtype), factor)
            norm.running_var.lerp_((var * (n / max(n - 1, 1))).to(norm.running_var.dtype), factor)
    return mean, torch.rsqrt(var + norm.eps)


def fused_norm(
        norm: nn.BatchNorm2d,
        u: Tensor,
        moments: Tensor,
        keep: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`norm_stats` and `plane_affine` in one fused op, from the plane moments of `u` the kernels computed:
    `(mean, invstd, scale, shift)`, float32 CPU tensors only."""
    factor = _running_factor(norm)
    batch_stats = _uses_batch_stats(norm)
    n = _values_per_channel(norm, u)
    return native.norm_plane_affine(
        moments, weight=norm.weight, bias=norm.bias, running_mean=norm.running_mean, running_var=norm.running_var,
        keep=keep, eps=norm.eps, factor=factor, batch_stats=batch_stats,
        update=batch_stats and norm.training and norm.running_mean is not None, count=n)


def norm_affine(
        norm: nn.BatchNorm2d,
        mean: Tensor,
        invstd: Tensor,
        keep: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """`(scale, shift)` with `norm(u) * keep == u * scale + shift`: `[C]`, or `[B, C]` with a drop-path factor."""
    return _affine(mean, invstd, norm.weight, norm.bias, keep)


def _affine(
        mean: Tensor,
        invstd: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        keep: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
    if keep is not None:
        keep = keep.to(scale.dtype)[:, None]
        scale, shift = scale * keep, shift * keep
    return scale, shift


def norm_reference(
        norm: nn.BatchNorm2d,
        u: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        keep: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """`norm_stats` and `norm_affine` as one differentiable function of `u`, `weight` and `bias`, for the
    Functions' `reference`: batch statistics are recomputed, running ones neither read nor updated in training."""
    acc = _acc_dtype(u)
    if _uses_batch_stats(norm):
        var, mean = torch.var_mean(u.to(acc), dim=(0, 2, 3), correction=0)
        invstd = torch.rsqrt(var + norm.eps)
    else:
        mean, invstd = norm.running_mean.to(acc), torch.rsqrt(norm.running_var.to(acc) + norm.eps)
    return _affine(mean, invstd, weight, bias, keep)


def plane_affine(
        norm: nn.BatchNorm2d,
        mean: Tensor,
        invstd: Tensor,
        keep: Optional[Tensor],
        batch: int,
) -> Tuple[Tensor, Tensor]:
    """`norm_affine` as contiguous per-plane `[B, C]` tensors (the layout of the fused kernels)."""
    scale, shift = norm_affine(norm, mean, invstd, keep)
    return scale.expand(batch, -1).contiguous(), shift.expand(batch, -1).contiguous()


def weight_or_ones(norm: nn.BatchNorm2d, like: Tensor) -> Tensor:
    """The norm's weight, or ones for a norm without affine weight (the kernels take one)."""
    return norm.weight.detach() if norm.weight is not None else torch.ones_like(like)


def affine_grads(
        norm: nn.BatchNorm2d,
        d_weight: Tensor,
        d_bias: Tensor,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernels' gradients of the norm's weight and bias, None for a norm without them."""
    return (d_weight if norm.weight is not None else None), (d_bias if norm.bias is not None else None)


def norm_backward(
        norm: nn.BatchNorm2d,
        grad: Tensor,
        u: Tensor,
        mean: Tensor,
        invstd: Tensor,
        batch_stats: bool,
        needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of `norm(u)` for its input, weight and bias, given the gradient `grad` of its output."""
    mask = [needs[0], needs[1] and norm.weight is not None, needs[2] and norm.bias is not None]
    if batch_stats:  # the saved mean / invstd are what the forward used
        return torch.ops.aten.native_batch_norm_backward(
            grad, u, norm.weight, None, None, mean, invstd, True, norm.eps, mask)
    # running statistics: an affine map; the forward's statistics go in as the "running" ones
    return torch.ops.aten.native_batch_norm_backward(
        grad, u, norm.weight, mean, invstd.pow(-2) - norm.eps, None, None, False, norm.eps, mask)


def _map(v: Tensor, like: Tensor) -> Tensor:
    """`[C]` or `[B, C]` per-channel values as a broadcastable `[B|1, C, 1, 1]` in `like`'s dtype."""
    v = v.to(like.dtype)
    return v.view(1, -1, 1, 1) if v.dim() == 1 else v[:, :, None, None]


def dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """`t` in contiguous layout (None stays None); a no-op for the dense gradients a network usually passes."""
    return None if t is None else t.contiguous()


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """A per-sample factor `[B]` as a broadcastable `[B, 1, 1, 1]` in `like`'s dtype."""
    return v.to(like.dtype).view(-1, 1, 1, 1)


def tail_output(pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """`relu(pre * scale + shift + shortcut)` with the per-sample / per-channel `scale`, `shift` of the tail's
    BatchNorm and drop path. Forward and backward both call this, so the recomputed `x` is the forward's."""
    if native.trainable(pre, shortcut):
        return native.tail_forward(pre, shortcut, scale, shift)[0]
    return torch.addcmul(_map(shift, pre), pre, _map(scale, pre)).add_(shortcut).relu_()


def tail_reference(pre: Tensor, shortcut: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """`tail_output` in differentiable PyTorch ops, none in place (`replay` hands it views of saved tensors)."""
    return torch.relu(torch.addcmul(_map(shift, pre), pre, _map(scale, pre)) + shortcut)


def must_replay(*extra_grads: Optional[Tensor]) -> bool:
    """In a Function's backward: whether to `replay` its `reference` rather than run the fast backward. True
    when the gradient must itself be differentiable (grad mode is on inside a backward exactly when
    `create_graph=True`), when functorch batches the backward, or when any of `extra_grads` (gradients of
    outputs the fast backward treats as constants) arrived."""
    return torch.is_grad_enabled() or native.transforms_active() or any(g is not None for g in extra_grads)


def replay(
        reference: Callable[..., Sequence[Tensor]],
        inputs: Sequence[Optional[Tensor]],
        grads: Sequence[Optional[Tensor]],
        wanted: Sequence[bool],
) -> List[Optional[Tensor]]:
    """Backward by differentiating `reference(*inputs)` with autograd: the gradients of the `wanted` inputs
    for output gradients `grads` (None entries count as zero), None elsewhere.

    With `create_graph=True` the result carries a graph: `inputs` must then be the tensors the Function saved,
    whose history reaches back into the network, so a second backward differentiates through the maths, the
    recomputation included. Each wanted input is differentiated through a fresh view of itself, so an input
    that also feeds another input (the block input `shortcut` of MRLA-light, which `x` is computed from) gets
    only its own direct share. Otherwise the recomputation runs on detached copies, its graph freed on return.
    """
    create_graph = torch.is_grad_enabled()
    device = next(t.device.type for t in inputs if t is not None)
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        args = [_replay_input(t, w, create_graph) for t, w in zip(inputs, wanted)]
        outs = reference(*args)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    targets = [i for i, (t, w) in enumerate(zip(args, wanted)) if w and t is not None and t.requires_grad]
    result: List[Optional[Tensor]] = [None] * len(inputs)
    if pairs and targets:
        found = torch.autograd.grad(
            [o for o, _ in pairs], [args[i] for i in targets], [g for _, g in pairs],
            create_graph=create_graph, allow_unused=True)
        for i, g in zip(targets, found):
            result[i] = g
    return result


def _replay_input(t: Optional[Tensor], wanted: bool, create_graph: bool) -> Optional[Tensor]:
    if t is None:
        return None
    if create_graph:
        return t.view_as(t) if wanted else t
    return t.detach().requires_grad_(wanted and t.is_floating_point())


class BlockTail(torch.autograd.Function):
    """`x = relu(norm(pre) * keep + shortcut)` and its pooled descriptor, keeping `pre` and `shortcut` only.

    Outputs `(x, pooled, scale, shift)`; the last two (`[B, C]`) are the recipe `tail_output` recomputes `x`
    from, for the branch Function that consumes `x`. The fast backward treats them as constants (the branch's
    first derivative goes to `x`); a branch's differentiable backward (`replay`) reads them, and their own
    gradient, which only a second derivative produces, is replayed here.
    """

    @staticmethod
    def forward(ctx, pre, shortcut, weight, bias, norm, keep):
        ctx.set_materialize_grads(False)
        fused = native.trainable(pre, shortcut)
        with torch.autocast(pre.device.type, enabled=False):
            if fused:
                mean, invstd, scale, shift = fused_norm(norm, pre, native.plane_moments(pre), keep)
                x, pooled = native.tail_forward(pre, shortcut, scale, shift)
            else:
                mean, invstd = norm_stats(norm, pre)
                scale, shift = plane_affine(norm, mean, invstd, keep, pre.shape[0])
                x = tail_output(pre, shortcut, scale, shift)
                pooled = x.mean((2, 3))
        ctx.norm, ctx.fused = norm, fused
        ctx.batch_stats = _uses_batch_stats(norm)
        ctx.save_for_backward(pre, shortcut, scale, shift, mean, invstd, keep, weight, bias)
        return x, pooled, scale, shift

    @staticmethod
    def reference(pre, shortcut, weight, bias, norm, keep):
        """The forward's outputs in differentiable PyTorch ops, without side effects."""
        scale, shift = norm_reference(norm, pre, weight, bias, keep)
        batch = pre.shape[0]
        scale, shift = scale.expand(batch, -1), shift.expand(batch, -1)
        x = tail_reference(pre, shortcut, scale, shift)
        return x, x.mean((2, 3)), scale, shift

    @staticmethod
    def backward(ctx, grad_x, grad_pooled, grad_scale, grad_shift):
        pre, shortcut, scale, shift, mean, invstd, keep, weight, bias = ctx.saved_tensors
        norm = ctx.norm
        needs = ctx.needs_input_grad
        if grad_x is None and grad_pooled is None and grad_scale is None and grad_shift is None:
            return None, None, None, None, None, None
        if must_replay(grad_scale, grad_shift):
            g = replay(
                lambda *t: BlockTail.reference(*t, norm, keep), [pre, shortcut, weight, bias],
                [grad_x, grad_pooled, grad_scale, grad_shift], needs[:4])
            return (*g, None, None)
        return BlockTail._fast_backward(ctx, grad_x, grad_pooled, pre, shortcut, scale, shift, mean, invstd, keep)

    @staticmethod
    def _fast_backward(ctx, grad_x, grad_pooled, pre, shortcut, scale, shift, mean, invstd, keep):
        norm = ctx.norm
        needs = ctx.needs_input_grad
        if ctx.fused:  # incoming gradients may be expanded views: the kernels read dense maps
            g_pre, g_short, g_w, g_b = native.tail_backward(
                pre, shortcut, scale, shift, grad_x=dense(grad_x), grad_pooled=dense(grad_pooled), mean=mean,
                invstd=invstd,
                norm_weight=weight_or_ones(norm, mean), keep=keep, batch_stats=ctx.batch_stats)
            return (g_pre, g_short, *affine_grads(norm, g_w, g_b), None, None)
        x = tail_output(pre, shortcut, scale, shift)
        grad = torch.zeros_like(x) if grad_x is None else grad_x
        if grad_pooled is not None:
            grad = grad + _map(grad_pooled / (x.shape[2] * x.shape[3]), x)
        g_short = torch.ops.aten.threshold_backward(grad, x, 0)
        g_norm = g_short if keep is None else g_short * per_sample(keep, g_short)
        g_pre, g_w, g_b = norm_backward(norm, g_norm, pre, mean, invstd, ctx.batch_stats, needs[:1] + needs[2:4])
        return g_pre, g_short if needs[1] else None, g_w, g_b, None, None


class GatedTail(torch.autograd.Function):
    """`x = relu(norm(pre) * gate * keep + shortcut)` with a channel gate `gate, head = gate_fn(mean(norm(pre)),
    state, weights)` (SE, ECA, DIANet: `gates.py`), keeping `pre` and `shortcut` only, on the fused kernels.

    The gate reads the pooled norm output, so the norm's statistics come first (one pass for the plane moments,
    which also give the pooled output), then the gate on `[B, C]` tensors, then one pass for `x`. Backward runs
    the gate's backward between the kernels' two passes: the first yields the shortcut's gradient and the gate's,
    the gate (recomputed on its `[B, C]` inputs, differentiated with autograd) the pooled output's, and the second
    pass folds both into one BatchNorm backward. Outputs `(x, *head)`: `head` replaces the first entries of the
    carried state (DIANet's `h`, `c`); the rest passes through outside the Function.
    """

    @staticmethod
    def forward(ctx, pre, shortcut, weight, bias, norm, keep, gate_fn, n_state, *inputs):
        ctx.set_materialize_grads(False)
        with torch.autocast(pre.device.type, enabled=False):
            x, head, (mean, invstd, scale, shift, plane_mean, gain) = gated_tail_forward(
                pre, norm, shortcut, keep, gate_fn, list(inputs[:n_state]), list(inputs[n_state:]))
        ctx.norm, ctx.gate_fn, ctx.n_state = norm, gate_fn, n_state
        ctx.batch_stats = _uses_batch_stats(norm)
        ctx.save_for_backward(pre, shortcut, weight, bias, keep, mean, invstd, scale, shift, plane_mean, gain, *inputs)
        return (x, *head)

    @staticmethod
    def reference(pre, shortcut, weight, bias, *inputs, norm, keep, gate_fn, n_state):
        """The forward's outputs in differentiable PyTorch ops, without side effects."""
        scale, shift = norm_reference(norm, pre, weight, bias, None)
        y = pre * _map(scale, pre) + _map(shift, pre)
        gate, head = gate_fn(y.mean((2, 3)), list(inputs[:n_state]), list(inputs[n_state:]))
        if keep is not None:
            gate = gate * keep.to(gate.dtype)[:, None]
        return (torch.relu(y * _map(gate, y) + shortcut), *head)

    @staticmethod
    def backward(ctx, grad_x, *grad_head):
        saved = ctx.saved_tensors
        pre, shortcut, weight, bias, keep, mean, invstd, scale, shift, plane_mean, gain = saved[:11]
        inputs = saved[11:]
        needs = ctx.needs_input_grad
        if grad_x is None and all(g is None for g in grad_head):
            return (None,) * len(needs)
        if must_replay():
            kw = dict(norm=ctx.norm, keep=keep, gate_fn=ctx.gate_fn, n_state=ctx.n_state)
            g = replay(lambda *t: GatedTail.reference(*t, **kw), [pre, shortcut, weight, bias, *inputs],
                       [grad_x, *grad_head], needs[:4] + needs[8:])
            return (*g[:4], None, None, None, None, *g[4:])
        g_short, sums = native.tail_grad_sums(
            pre, shortcut, scale * gain, shift * gain, grad_x=dense(grad_x), grad_pooled=None)
        # the gate's gradient, sum over each plane of g_short * norm(pre), from the sums of g_short and g_short * pre
        grad_gate = scale.double() * sums[1] + shift.double() * sums[0]
        if keep is not None:
            grad_gate = grad_gate * keep.double()[:, None]
        n = ctx.n_state
        with torch.enable_grad(), torch.autocast(pre.device.type, enabled=False):
            pooled = (plane_mean * scale + shift).requires_grad_()
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
            gate, head = ctx.gate_fn(pooled, leaves[:n], leaves[n:])
        outs, out_grads = [gate], [grad_gate.to(gate.dtype)]
        outs += [t for t, g in zip(head, grad_head) if g is not None and t.requires_grad]
        out_grads += [g for t, g in zip(head, grad_head) if g is not None and t.requires_grad]
        wanted = [pooled] + [t for t in leaves if t.requires_grad]
        found = torch.autograd.grad(outs, wanted, out_grads, allow_unused=True)
        grad_pooled = found[0] if found[0] is not None else torch.zeros_like(pooled)
        by_leaf = {id(t): g for t, g in zip(wanted[1:], found[1:])}
        # the norm output's gradient is g_short * gain + grad_pooled / HW: its plane sums, and those times pre
        gp = grad_pooled.double()
        norm_sums = torch.stack([gain.double() * sums[0] + gp, gain.double() * sums[1] + gp * plane_mean.double()])
        g_pre, g_w, g_b = native.norm_backward_planes(
            g_short, pre, sums=norm_sums, gain=gain.contiguous(),
            offset=(grad_pooled / (pre.shape[2] * pre.shape[3])).contiguous(), mean=mean, invstd=invstd,
            norm_weight=weight_or_ones(ctx.norm, mean), batch_stats=ctx.batch_stats)
        g_w, g_b = affine_grads(ctx.norm, g_w, g_b)
        return (g_pre, g_short if needs[1] else None, g_w, g_b, None, None, None, None,
                *[by_leaf.get(id(t)) for t in leaves])


def gated_tail_forward(
        pre: Tensor,
        norm: nn.BatchNorm2d,
        shortcut: Tensor,
        keep: Optional[Tensor],
        gate_fn: Callable[[Tensor, List[Tensor], List[Tensor]], Tuple[Tensor, List[Tensor]]],
        state: List[Tensor],
        weights: List[Tensor],
) -> Tuple[Tensor, List[Tensor], Tuple[Tensor, ...]]:
    """The gated tail on the fused kernels, without autograd: `(x, head, (mean, invstd, scale, shift, plane_mean,
    gain))`, the last what `GatedTail`'s backward needs. Inference (`gates.py`) calls it directly."""
    moments = native.plane_moments(pre)
    mean, invstd, scale, shift = fused_norm(norm, pre, moments, None)
    plane_mean = (moments[0] / (pre.shape[2] * pre.shape[3])).to(pre.dtype)
    gate, head = gate_fn(plane_mean * scale + shift, state, weights)
    gain = gate if keep is None else gate * keep.to(gate.dtype)[:, None]
    x, _ = native.tail_forward(pre, shortcut, scale * gain, shift * gain)
    return x, head, (mean, invstd, scale, shift, plane_mean, gain)


def gated_tail(
        pre: Tensor,
        norm: nn.BatchNorm2d,
        shortcut: Tensor,
        keep: Optional[Tensor],
        gate_fn: Callable[[Tensor, List[Tensor], List[Tensor]], Tuple[Tensor, List[Tensor]]],
        state: List[Tensor],
        weights: List[Tensor],
) -> Tuple[Tensor, List[Tensor]]:
    """`GatedTail` applied: the block output and the carried state with the gate's new head."""
    outs = GatedTail.apply(pre, shortcut, norm.weight, norm.bias, norm, keep, gate_fn, len(state), *state, *weights)
    head = list(outs[1:])
    return outs[0], head + state[len(head):]


class NormReLU(torch.autograd.Function):
    """`relu(norm(u))`, a block's inner BatchNorm and ReLU, on the fused CPU kernels (float32 contiguous maps only):
    the plane moments and the normalised, rectified output forward; backward the BatchNorm gradient sums over the
    rectified gradient, then the input gradient, the ReLU mask recomputed from `u` in both passes. Keeps `u` and
    per-plane vectors; the output is kept by the next conv, as with the modules."""

    @staticmethod
    def forward(ctx, u, weight, bias, norm):
        mean, invstd, scale, shift = fused_norm(norm, u, native.plane_moments(u), None)
        ctx.norm, ctx.batch_stats = norm, _uses_batch_stats(norm)
        ctx.save_for_backward(u, scale, shift, mean, invstd, weight, bias)
        return native.norm_relu_forward(u, scale=scale, shift=shift)

    @staticmethod
    def reference(u, weight, bias, norm):
        """The output in differentiable PyTorch ops, without side effects (see `replay`)."""
        scale, shift = norm_reference(norm, u, weight, bias, None)
        return (torch.relu(torch.addcmul(_map(shift, u), u, _map(scale, u))),)

    @staticmethod
    def backward(ctx, grad):
        u, scale, shift, mean, invstd, weight, bias = ctx.saved_tensors
        norm = ctx.norm
        if must_replay():
            g = replay(lambda *t: NormReLU.reference(*t, norm), [u, weight, bias], [grad], ctx.needs_input_grad[:3])
            return (*g, None)
        g_u, g_w, g_b = native.norm_relu_backward(
            u, scale=scale, shift=shift, grad_y=dense(grad), mean=mean, invstd=invstd,
            norm_weight=weight_or_ones(norm, mean), batch_stats=ctx.batch_stats)
        return (g_u, *affine_grads(norm, g_w, g_b), None)


def norm_relu(u: Tensor, norm: nn.BatchNorm2d) -> Tensor:
    """`relu(norm(u))`: as `NormReLU` where its kernels take `u`, else as the modules compute it (under CPU autocast
    a float32 block input gives half-precision conv outputs)."""
    if native.trainable(u):
        return NormReLU.apply(u, norm.weight, norm.bias, norm)
    return torch.relu(norm(u))


def norm_relu_usable(x: Tensor, pairs: Sequence[Tuple[nn.Module, nn.Module]]) -> bool:
    """Whether a block's inner `(norm, act)` pairs run as `NormReLU` on input `x`: the lean path active and its
    fused kernels usable on `x` (float32 contiguous CPU), every norm a plain `nn.BatchNorm2d` normalising with
    batch statistics, every act `nn.ReLU`. A frozen norm (eval mode, e.g. detection fine-tuning) is an affine map
    that the modules already run in two passes: it stays with them."""
    if not (usable(x) and native.trainable(x)):
        return False
    return all(type(n) is nn.BatchNorm2d and _uses_batch_stats(n) and type(a) is nn.ReLU for n, a in pairs)


class ChannelConv(torch.autograd.Function):
    """The ECA channel conv of pooled descriptors, `F.conv1d(pooled.unsqueeze(1), weight, padding=(k - 1) // 2)`
    (`[B, C]`, `[F, 1, k]` -> `[B, F, C]`), on the fused CPU kernels (float32 CPU tensors only)."""

    @staticmethod
    def forward(ctx, pooled, weight):
        ctx.save_for_backward(pooled, weight)
        return native.channel_conv(pooled, weight)

    @staticmethod
    def reference(pooled, weight):
        return (F.conv1d(pooled.unsqueeze(1), weight, None, 1, (weight.shape[-1] - 1) // 2),)

    @staticmethod
    def backward(ctx, grad):
        pooled, weight = ctx.saved_tensors
        if must_replay():
            return tuple(replay(ChannelConv.reference, [pooled, weight], [grad], ctx.needs_input_grad))
        return native.channel_conv_backward(dense(grad), pooled, weight)


class Tail(NamedTuple):
    """What `block_tail` hands a branch: the block output `x`, the recipe `tail_output(pre, shortcut, scale,
    shift)` recomputes it from (for the branch Function to keep instead of `x`), and the pooled descriptor."""
    x: Tensor
    pre: Tensor
    shortcut: Tensor
    scale: Tensor
    shift: Tensor
    pooled: Tensor

    @property
    def inputs(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`(x, pre, shortcut, scale, shift)`, the leading inputs of every branch Function."""
        return self.x, self.pre, self.shortcut, self.scale, self.shift


def block_tail(pre: Tensor, norm: nn.BatchNorm2d, shortcut: Tensor, keep: Optional[Tensor]) -> Tail:
    """`BlockTail` applied."""
    x, pooled, scale, shift = BlockTail.apply(pre, shortcut, norm.weight, norm.bias, norm, keep)
    return Tail(x, pre, shortcut, scale, shift, pooled)
