"""Key-Correlated Layer Attention (KCLA).

Paper: `Enhancing Layer Interaction Using Key-Correlated Layer Attention` (official code: bgx666/KCLA).

Every block output `x_t` joins a running, key-weighted average over all earlier block outputs of the
network; the block receives a gated depth-wise projection of that average:

    alpha_t = exp(min(||K_t|| / norm_d, 10))                 per sample and head
    A_t     = sum_j alpha_j x_j / (sum_j alpha_j + 1e-3)      the normalised history
    O_t     = DropPath(ReLU(BN(sigmoid(W_head e_t) * DW3(A_t))))   with e_t = <Q_t, K_t / ||K_t||>

The official code carries `U = sum alpha x` and `Z = sum alpha`. This module carries the normalised
history `A = U / (Z + eps)` itself (plus `Z`): one `lerp` per block updates it, `A` stays within the
range of the activations (no `e^10`-scale sums, so it is safe in low precision), and no extra pass
is needed to normalise it before the value convolution. `A` and `Z` are kept in float32 (float64 for a
float64 model).

`KCLAVariant` holds the paper's Table V ablations (docs/design/layer_attention.md#la-kcla-ablations); its
defaults are the model above.
"""
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from . import lean, native
from ._checks import check_bool, check_choice, check_int
from ._common import (
    ChannelConv1d, LayerAttnBase, accumulation_dtype, depthwise_conv3x3, depthwise_conv3x3_backward,
    eca_channel_conv, per_channel)

__all__ = ['KCLA', 'KCLAVariant', 'kcla_temperatures', 'KCLA_TEMPERATURES', 'KCLA_FORMS']

_HISTORY_EPS = 1e-3  # added to Z when normalising the history (official value)
_MAX_LOG_WEIGHT = 10.  # upper clamp of the key-weight exponent (official value)
_KEY_NORM_EPS = 1e-12  # guards <Q, K> / ||K|| for an all-zero key (official code divides by zero)

KCLA_TEMPERATURES = ('log_uniform', 'equal')
KCLA_FORMS = ('kcla', 'rla')


@dataclass(frozen=True)
class KCLAVariant:
    """The parts of KCLA that the paper's ablation (Table V) switches off; the defaults are KCLA.

    Attributes:
        temperatures: 'log_uniform': head `h` scales its key norm by `s_h`, log-uniform in [0.7, 1/0.7];
            'equal': `s_h = 1` for every head (Table V (a)).
        key_exp: Weight each block by `exp(min(s_h ||K_h||, 10))`; False: by `s_h ||K_h||` (Table V (b)).
        head_attn: Gate each head by `sigmoid(W_head e)`; False: no gate, and no `W_head` nor query conv,
            which only feed it (Table V (c)).
        form: 'kcla': the value conv of the current block acts on the aggregated history; 'rla': every block
            aggregates its own value `DW3_j(x_j)`, static once computed, as RLA caches values (Table V (d)).
        cross_stage: Carry the history across stages through the re-summary cells; False: every stage starts a
            new history at its first block (Table V (f)).
    """
    temperatures: str = 'log_uniform'
    key_exp: bool = True
    head_attn: bool = True
    form: str = 'kcla'
    cross_stage: bool = True

    def __post_init__(self):
        for f in fields(self):
            self.check_field('KCLAVariant', f.name, getattr(self, f.name))

    @staticmethod
    def check_field(owner: str, name: str, value: Any) -> None:
        """Check one field's value; the message names `owner` (a model, where a model kwarg sets the field)."""
        if name == 'temperatures':
            check_choice(owner, name, value, KCLA_TEMPERATURES)
        elif name == 'form':
            check_choice(owner, name, value, KCLA_FORMS)
        else:
            check_bool(owner, name, value)


def kcla_temperatures(num_heads: int, device=None, mode: str = 'log_uniform') -> torch.Tensor:
    """Per-head key-norm divisors `norm_d = 1 / s`, `s` log-uniform in [0.7, 1/0.7] (`mode='equal'`: all ones).

    Computed with the official float32 op sequence so converted checkpoints hold identical values.
    """
    cpu = torch.device('cpu')  # explicit, so a `with torch.device('meta')` context cannot intercept it
    if mode == 'equal':
        return torch.ones(num_heads, device=cpu).to(torch.get_default_device() if device is None else device)
    lo, hi = torch.log(torch.tensor(0.7, device=cpu)), torch.log(torch.tensor(1 / 0.7, device=cpu))
    norm_d = torch.exp(torch.linspace(lo.item(), hi.item(), num_heads, device=cpu)).reciprocal()
    return norm_d.to(torch.get_default_device() if device is None else device)


# fx leaves. timm's registry makes fx patch a function only in the globals of the traced `forward`'s module,
# which for these cells is `_common` (`LayerAttnBase.forward`); `torch.fx.wrap` patches it here as well.
torch.fx.wrap('accumulation_dtype')


@torch.fx.wrap
@register_notrace_function  # layout-dependent: fx records a call
def grouped_pointwise(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1x1 conv (stride 1, no bias). For NCHW maps one batched matmul, faster than oneDNN's grouped
    conv on CPU; other layouts (channels_last) keep the conv, which preserves their layout."""
    if not x.is_contiguous():
        return F.conv2d(x, weight, None, 1, 0, 1, groups)
    b, c, h, w = x.shape
    out_chs = weight.shape[0]
    x = x.view(b, groups, c // groups, h * w)
    return torch.matmul(weight.view(groups, out_chs // groups, c // groups), x).view(b, out_chs, h, w)


class KCLABranch(torch.autograd.Function):
    """One KCLA step on the tail's output `x`: `A' = lerp(A, x, w)`, `out = x + relu(BN(gate * DW3(A'))) * keep`.

    Keeps the tail's recipe for `x` (`pre`, `shortcut`, `scale`, `shift`), the incoming history `A` and
    per-channel vectors; backward recomputes `x`, `A'` and the value map (see `lean`). Returns `(out, A')`.
    """

    @staticmethod
    def forward(ctx, x, pre, shortcut, scale, shift, hist, weight, gate, v_weight, norm_weight, norm_bias, norm, keep):
        ctx.set_materialize_grads(False)
        fused = native.trainable(x, pre, shortcut, hist, weight, gate, v_weight)
        with torch.autocast(x.device.type, enabled=False):
            if fused:
                u, hist_new, moments = native.kcla_train_values(
                    x, hist=hist, weight=weight, gate=gate, v_weight=v_weight)
                mean, invstd, a, b = lean.fused_norm(norm, u, moments, keep)
                out = native.affine_residual_(u, x=x, a=a, b=b, relu=True)
            else:
                hist_new = _kcla_history(x, hist, weight)
                u = depthwise_conv3x3(hist_new.to(x.dtype), v_weight).mul_(gate[:, :, None, None])
                mean, invstd = lean.norm_stats(norm, u)
                a, b = lean.norm_affine(norm, mean, invstd, keep)
                out = torch.addcmul(lean._map(b, u), u, lean._map(a, u)).relu_().add_(x)
        ctx.norm, ctx.fused = norm, fused
        ctx.batch_stats = lean._uses_batch_stats(norm)
        ctx.save_for_backward(
            pre, shortcut, scale, shift, hist, weight, gate, v_weight, mean, invstd, keep, a, b, norm_weight, norm_bias)
        return out, hist_new

    @staticmethod
    def reference(x, hist, weight, gate, v_weight, norm_weight, norm_bias, norm, keep):
        """`(out, A')` in differentiable PyTorch ops, without side effects (see `lean.replay`)."""
        hist_new = _kcla_history(x, hist, weight)
        u = depthwise_conv3x3(hist_new.to(x.dtype), v_weight) * gate[:, :, None, None]
        a, b = lean.norm_reference(norm, u, norm_weight, norm_bias, keep)
        return torch.relu(torch.addcmul(lean._map(b, u), u, lean._map(a, u))) + x, hist_new

    @staticmethod
    def backward(ctx, grad_out, grad_hist):
        pre, shortcut, scale, shift, hist, weight, gate, v_weight, mean, invstd, keep, a, b, nw, nb = ctx.saved_tensors
        norm = ctx.norm
        needs = ctx.needs_input_grad
        if lean.must_replay():
            g = lean.replay(
                lambda *t: KCLABranch.reference(*t, norm, keep),
                [lean.tail_reference(pre, shortcut, scale, shift), hist, weight, gate, v_weight, nw, nb],
                [grad_out, grad_hist], (needs[0],) + needs[5:11])
            return (g[0], None, None, None, None, *g[1:], None, None)
        if grad_out is None:
            grad_out = torch.zeros_like(pre)
        if ctx.fused:  # incoming gradients may be expanded or strided views: the kernels read dense maps
            g_x, g_hist, g_weight, g_gate, g_v, g_nw, g_nb = native.kcla_train_backward(
                pre, shortcut, scale, shift, hist=hist, weight=weight, gate=gate, v_weight=v_weight, a=a, b=b,
                keep=keep, mean=mean, invstd=invstd, norm_weight=lean.weight_or_ones(norm, mean),
                batch_stats=ctx.batch_stats, grad_out=lean.dense(grad_out), grad_hist=lean.dense(grad_hist))
            g_nw, g_nb = lean.affine_grads(norm, g_nw, g_nb)
        else:
            x = lean.tail_output(pre, shortcut, scale, shift)
            x_acc = x.to(weight.dtype)
            w4 = weight[:, :, None, None]
            value_in = _kcla_history(x, hist, weight).to(x.dtype)
            value = depthwise_conv3x3(value_in, v_weight)
            u = value * gate[:, :, None, None]
            g_u = torch.ops.aten.threshold_backward(grad_out, torch.addcmul(lean._map(b, u), u, lean._map(a, u)), 0)
            if keep is not None:
                g_u = g_u.mul_(lean.per_sample(keep, g_u))
            g_u, g_nw, g_nb = lean.norm_backward(
                norm, g_u, u, mean, invstd, ctx.batch_stats, (True, needs[9], needs[10]))
            g_gate = (g_u * value).sum((2, 3))
            g_value = g_u.mul_(gate[:, :, None, None])
            g_in, g_v = depthwise_conv3x3_backward(g_value, value_in, v_weight, needs[8])
            g_new = g_in.to(weight.dtype)
            if grad_hist is not None:
                g_new = g_new.add_(grad_hist)
            g_x = torch.addcmul(grad_out, g_new, w4.to(g_new.dtype)) if x.dtype == g_new.dtype \
                else grad_out + (g_new * w4).to(x.dtype)
            if hist is None:
                g_weight, g_hist = (g_new * x_acc).sum((2, 3)), None
            else:
                g_weight = (g_new * (x_acc - hist)).sum((2, 3))
                g_hist = g_new * (1 - w4) if needs[5] else None
        return (g_x, None, None, None, None, g_hist, g_weight, g_gate, g_v, g_nw, g_nb, None, None)


def _kcla_history(x: torch.Tensor, hist: Optional[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """`A' = lerp(A, x, w)` (`w * x` without a history) in the history's float32 / float64."""
    x_acc = x.to(weight.dtype)
    w4 = weight[:, :, None, None]
    return x_acc * w4 if hist is None else torch.lerp(hist, x_acc, w4)


class KCLA(LayerAttnBase):
    """KCLA cell attached to one residual block.

    State: `[A, Z]` with `A` the normalised history `[B, C_prev, H_prev, W_prev]` and `Z` the weight sum
    `[B, g_prev]`, both float32. A cell with `rebuild=True` first compresses an incoming history into a
    single re-weighted token (the official "init layer"): `U / Z`, a grouped 1x1 projection when the
    width changes, BatchNorm, then a weight from the token's own key. A cell with `restart=True` ignores any
    incoming state and starts a new history (a stage's first cell without the cross-stage design).
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 32,
            in_channels: Optional[int] = None,
            rebuild: bool = False,
            history_stride: int = 2,
            drop_path: float = 0.2,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            variant: Optional[KCLAVariant] = None,
            restart: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            channels: Width `C` of the block output.
            head_dim: Channels per head `d`; `g = C // d` heads.
            in_channels: Width of the incoming history when it differs from `channels` (stage change).
            rebuild: Re-summarise the incoming history before adding this block (official init cell).
            history_stride: Spatial stride between the incoming history and this block (1 if dilated).
            drop_path: Drop-path rate of the attention branch.
            norm_layer: Norm for the branch output and the rebuilt history.
            variant: The ablations of Table V (`KCLAVariant`; default: none). Its `cross_stage` is the model's
                business: the factory then builds stage entries with `restart`.
            restart: Ignore the incoming state: this block starts a new history (exclusive with `rebuild`).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__(channels, head_dim, drop_path, norm_layer, **dd)
        check_int('KCLA', 'history_stride', history_stride)
        if in_channels is not None:
            check_int('KCLA', 'in_channels', in_channels)
        variant = variant if variant is not None else KCLAVariant()
        if not isinstance(variant, KCLAVariant):
            raise TypeError(f'KCLA: variant must be a KCLAVariant, got {variant!r}')
        check_bool('KCLA', 'restart', restart)
        if restart and rebuild:
            raise ValueError('KCLA: a cell cannot both restart and rebuild the history, got restart=True, rebuild=True')
        self.history_eps = _HISTORY_EPS
        self.max_log_weight = _MAX_LOG_WEIGHT
        self.key_norm_eps = _KEY_NORM_EPS
        self.temperatures = variant.temperatures
        self.key_exp = variant.key_exp
        self.value_first = variant.form == 'rla'
        self.restart = restart
        # The fused kernels compute the default maths: `native.kcla_` the key weight `exp(min(., 10))`, the head
        # gate and the value after aggregation (any temperatures); `KCLABranch` only the last.
        self.fused_eval = variant.key_exp and variant.head_attn and not self.value_first
        self.fused_train = not self.value_first

        if variant.head_attn:
            self.head_gate = nn.Linear(self.num_heads, self.num_heads, bias=False, **dd)
        else:
            self.q = None  # only the head gate reads the query
            self.head_gate = None
        self.register_buffer(
            'norm_d', kcla_temperatures(self.num_heads, device=device, mode=variant.temperatures), persistent=True)

        # History re-summary (only for cells that can receive a history: never the network's first).
        if rebuild:
            in_channels = in_channels or channels
            if in_channels != channels:
                if in_channels % self.num_heads:
                    raise ValueError(
                        f'KCLA: the incoming history width ({in_channels}) must be divisible into as many groups as '
                        f'the block has heads ({self.num_heads} = {channels} channels / head_dim {head_dim})')
                self.hist_proj = nn.Conv2d(
                    in_channels, channels, 1, stride=history_stride, groups=self.num_heads, bias=False, **dd)
            else:
                self.hist_proj = None
            self.hist_k = ChannelConv1d(channels, **dd)
            self.hist_norm = norm_layer(channels, **dd)
        else:
            self.hist_proj = None
            self.hist_k = None
            self.hist_norm = None
        # Subsampling of the incoming history, a plain int: it exists with or without a projection, which
        # TorchScript then need not inspect (a `None` submodule has no attributes to read).
        self.hist_stride = history_stride if self.hist_proj is not None else 1
        self.reset_parameters()

    @torch.jit.ignore
    def reset_parameters(self) -> None:
        """Official init: xavier for the 1-D convs and the head gate (conv2d / BN are set by the model)."""
        for m in (self.q, self.k, self.hist_k, self.head_gate):
            if m is not None:
                nn.init.xavier_uniform_(m.weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse temperatures other than this cell's: `norm_d` is fixed by `temperatures`, and loading another
        model's (a KCLA checkpoint into a `temperatures='equal'` model, or back) would silently change the model."""
        value = state_dict.get(prefix + 'norm_d')
        own = self.norm_d
        if isinstance(value, torch.Tensor) and value.numel() == own.numel() and not (value.is_meta or own.is_meta):
            value = value.detach().reshape(-1).float().cpu()
            if not torch.allclose(value, own.detach().float().cpu(), rtol=1e-6, atol=0.):
                modes = [m for m in ('log_uniform', 'equal')
                         if torch.allclose(value, kcla_temperatures(value.numel(), 'cpu', m), rtol=1e-6, atol=0.)]
                fix = f'build it with temperatures={modes[0]!r}' if modes else 'they are neither KCLA setting'
                error_msgs.append(
                    f"{prefix}norm_d: the checkpoint's KCLA temperatures are not this model's "
                    f"(temperatures={self.temperatures!r}); {fix}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _key_weight(self, key: torch.Tensor, acc: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-head key norm `[B, g]` and its weight `exp(min(||k|| / norm_d, 10))` (`||k|| / norm_d` without
        `key_exp`) in dtype `acc`."""
        key_norm = torch.linalg.vector_norm(key.view(-1, self.num_heads, self.head_dim).to(acc), dim=-1)
        scaled = key_norm.to(acc) / self.norm_d.to(acc)
        if not self.key_exp:
            return key_norm, scaled
        return key_norm, torch.exp(torch.clamp(scaled, max=self.max_log_weight))

    def _rebuild(
            self,
            hist: torch.Tensor,
            z: torch.Tensor,
            dtype: torch.dtype,
            acc: torch.dtype,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Compress the incoming history `U / Z` into one token weighted by its own key."""
        stride = self.hist_stride
        if stride > 1:
            # The projection is 1x1: subsampling first is exact, and the per-channel rescale below then
            # touches a quarter of the map (it is one full-size pass of the previous stage otherwise).
            hist = hist[:, :, ::stride, ::stride]
            if torch.is_grad_enabled():  # autograd would keep the view's whole full-size storage
                hist = hist.contiguous()
        if not self.key_exp:  # linear weights can sum to 0 (all keys 0; then U = 0): U / Z must stay finite
            z = z.clamp_min(self.key_norm_eps)
        hist = hist * per_channel((z + self.history_eps) / z, self.head_dim)[:, :, None, None]
        hist = hist.to(dtype)
        proj = self.hist_proj
        if proj is not None:
            hist = grouped_pointwise(hist, proj.weight, proj.groups)
        assert self.hist_k is not None and self.hist_norm is not None
        hist = self.hist_norm(hist)
        _, beta = self._key_weight(self.hist_k(hist.mean((2, 3))), acc)
        hist = hist.to(acc) * per_channel(beta / (beta + self.history_eps), self.head_dim)[:, :, None, None]
        return hist, beta

    def _weights(
            self,
            pooled: torch.Tensor,
            state: List[torch.Tensor],
            dtype: torch.dtype,
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-sample maths of one step, from the pooled block output `[B, C]` and the incoming state: the
        history to update (None at the network's first block; re-summarised where this cell does), its lerp
        weight `[B, C]` and the new weight sum `Z'` `[B, g]` (float32), and the head gate `[B, C]` in `dtype`.

        `A' = lerp(A, x, alpha / (Z' + eps))` is the convex combination `((Z + eps) A + alpha x) / (Z' + eps)`;
        at the first block `A' = alpha / (alpha + eps) * x`.
        """
        d = self.head_dim
        acc = accumulation_dtype(pooled)
        if self.q is None:  # no head attention: the key alone
            q: Optional[torch.Tensor] = None
            k = eca_channel_conv(pooled, self.k.weight).to(acc)[:, 0]
        else:
            q, k = self._query_key(pooled)
        key_norm, alpha = self._key_weight(k, acc)
        if len(state) == 0 or self.restart:
            hist: Optional[torch.Tensor] = None
            z = alpha
        else:
            hist, z = state[0], state[1]
            if self.hist_norm is not None:
                hist, z = self._rebuild(hist, z, dtype, acc)
            z = z + alpha
        weight = per_channel(alpha / (z + self.history_eps), d)
        head_gate = self.head_gate
        if q is None or head_gate is None:
            return hist, weight, z, torch.ones_like(pooled, dtype=dtype)
        # Head gate from the projection of Q on the unit key direction.
        score = (q.view(-1, self.num_heads, d) * k.view(-1, self.num_heads, d)).sum(-1) \
            / key_norm.clamp_min(self.key_norm_eps)
        # |score| <= ||q||: safe to hand to the (possibly half-precision) head gate in the feature dtype.
        gate = per_channel(torch.sigmoid(head_gate(score.to(dtype))), d)
        return hist, weight, z, gate

    def _attend(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add `x` (its value `DW3(x)` in the RLA form) to the history: the new history `A` and weight sum `Z`
        (float32), and the head gate `[B, C, 1, 1]`. With autograd off the incoming history, owned by this
        forward, is updated in place."""
        hist, weight, z, gate = self._weights(x.mean((2, 3)), state, x.dtype)
        if self.value_first:
            x = self.v(x)
        x_acc = x.to(weight.dtype)
        weight = weight[:, :, None, None]
        if hist is None:
            hist = x_acc * weight
        elif torch.is_grad_enabled():
            hist = torch.lerp(hist, x_acc, weight)
        else:
            hist = hist.lerp_(x_acc, weight)
        return hist, z, gate[:, :, None, None]

    def _value(self, hist: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The branch's value map in `dtype`, a new tensor: `DW3(A)`, or `A` itself in the RLA form (whose
        history aggregates values)."""
        if self.value_first:
            return hist.to(dtype, copy=True)
        return self.v(hist.to(dtype))

    def forward_reference(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The reference path: `x + DropPath(ReLU(BN(gate * DW3(A))))` with `norm` and `drop_path` as modules.
        The other paths are held equal to it (see `LayerAttnBase`)."""
        hist, z, gate = self._attend(x, state)
        value = self._value(hist, x.dtype)
        return x + self.drop_path(torch.relu(self.norm(value * gate))), [hist, z]

    @torch.jit.unused
    def tail_usable(self, pre: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]) -> bool:
        return self.fused_train and super().tail_usable(pre, shortcut, state)

    @torch.jit.unused
    def forward_lean(
            self,
            tail: lean.Tail,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        hist, weight, z, gate = self._weights(tail.pooled, state, tail.x.dtype)
        out, hist = KCLABranch.apply(
            *tail.inputs, hist, weight, gate, self.v.weight.to(tail.x.dtype), self.norm.weight, self.norm.bias,
            self.norm, keep)
        return out, [hist, z]

    def forward_folded(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval: `relu(BN(gate * V)) == relu((gate * scale) * V + shift)`; with autograd off in place on the
        value buffer. Equal to `forward_reference` in eval mode."""
        hist, z, gate = self._attend(x, state)
        value = self._value(hist, x.dtype)
        scale, shift = self._fold_norm()
        gate = gate * scale[:, None, None]
        if torch.is_grad_enabled():
            out = x + torch.relu(value * gate + shift[:, None, None])
        else:
            out = value.mul_(gate).add_(shift[:, None, None]).relu_().add_(x)
        return out, [hist, z]

    @torch.jit.unused
    def forward_native(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """`forward_folded` as one fused CPU op: history update and branch, both in place (the ablations the
        kernel does not compute take `forward_folded`)."""
        if not self.fused_eval:
            return self.forward_folded(x, shortcut, state)
        if len(state) == 0 or self.restart:
            hist, z = torch.empty_like(x), None
        else:
            hist, z = state[0], state[1]
            if self.hist_norm is not None:
                hist, z = self._rebuild(hist, z, x.dtype, torch.float32)
        scale, shift = self._fold_norm()
        z = native.kcla_(
            x,
            hist=hist,
            z=z,
            v_weight=self.v.weight,
            q_weight=self.q.weight,
            k_weight=self.k.weight,
            norm_d=self.norm_d,
            head_gate_weight=self.head_gate.weight,
            norm_scale=scale,
            norm_shift=shift,
            head_dim=self.head_dim,
            history_eps=self.history_eps,
            max_log_weight=self.max_log_weight,
            key_norm_eps=self.key_norm_eps,
        )
        return x, [hist, z]

    @torch.jit.unused
    def _native_inputs(self, shortcut: torch.Tensor, state: List[torch.Tensor]) -> List[torch.Tensor]:
        return state

    @torch.jit.unused
    def _state_len(self, incoming: int) -> int:
        return 2  # history, weight sum
