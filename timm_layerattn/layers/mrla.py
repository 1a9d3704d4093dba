"""Multi-head Recurrent Layer Attention (MRLA), light and base forms.

Paper: `Cross-Layer Retrospective Retrieving via Layer Attention` (ICLR 2023, official code:
joyfang1106/MRLA). Both forms build a query and a key per block from the pooled block output with
ECA-style channel convolutions and a value with a depth-wise 3x3 conv:

* MRLA-light approximates attention over all earlier layers recurrently: one sigmoid gate per head
  on the current value, plus a learned channel scale `lambda` on the block's shortcut standing in for
  the previous layer-attention output. `out = x + DropPath(BN(gate * V + lambda * shortcut))`.
* MRLA-base attends with a softmax over the keys of every earlier block of the stage and sums their
  cached values. `out = x + DropPath(ReLU(BN(sum_j softmax_j(<Q, K_j> / sqrt(d)) V_j)))`.
"""
import math
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn

from . import lean, native
from ._common import LayerAttnBase, depthwise_conv3x3, depthwise_conv3x3_backward, per_channel

__all__ = ['MRLALight', 'MRLABase']


class MRLALightBranch(torch.autograd.Function):
    """One MRLA-light step on the tail's output `x`: `out = x + BN(gate * DW3(x) + lambda * r) * keep`, `r` the
    tail's `shortcut` or, where given, `lambda_input` (DLA-light's refreshed shortcut).

    Keeps the tail's recipe for `x` (`pre`, `shortcut`, `scale`, `shift`), `lambda_input` and per-channel
    vectors; backward recomputes `x` and the value map (see `lean`).
    """

    @staticmethod
    def forward(ctx, x, pre, shortcut, scale, shift, gate, v_weight, lambda_t, norm_weight, norm_bias, norm, keep,
                lambda_input=None):
        ctx.set_materialize_grads(False)
        r = shortcut if lambda_input is None else lambda_input
        fused = native.trainable(x, pre, shortcut, scale, gate, v_weight, lambda_t, lambda_input)
        with torch.autocast(x.device.type, enabled=False):
            if fused:
                u, moments = native.mrla_light_train_values(
                    x, shortcut=r, gate=gate, v_weight=v_weight, lambda_t=lambda_t)
                mean, invstd, a, b = lean.fused_norm(norm, u, moments, keep)
                out = native.affine_residual_(u, x=x, a=a, b=b, relu=False)
            else:
                u = _light_input(x, r, gate, v_weight, lambda_t)
                mean, invstd = lean.norm_stats(norm, u)
                a, b = lean.norm_affine(norm, mean, invstd, keep)
                out = torch.addcmul(lean._map(b, u), u, lean._map(a, u)).add_(x)
        ctx.norm, ctx.fused = norm, fused
        ctx.batch_stats = lean._uses_batch_stats(norm)
        ctx.save_for_backward(
            pre, shortcut, scale, shift, gate, v_weight, lambda_t, mean, invstd, keep, norm_weight, norm_bias,
            lambda_input)
        return out

    @staticmethod
    def reference(x, r, gate, v_weight, lambda_t, norm_weight, norm_bias, norm, keep):
        """`out` in differentiable PyTorch ops, without side effects (see `lean.replay`)."""
        u = torch.addcmul(depthwise_conv3x3(x, v_weight) * gate[:, :, None, None], r, lambda_t.to(x.dtype))
        a, b = lean.norm_reference(norm, u, norm_weight, norm_bias, keep)
        return (torch.addcmul(lean._map(b, u), u, lean._map(a, u)) + x,)

    @staticmethod
    def backward(ctx, grad_out):
        pre, shortcut, scale, shift, gate, v_weight, lambda_t, mean, invstd, keep, nw, nb, lambda_input = \
            ctx.saved_tensors
        norm = ctx.norm
        needs = ctx.needs_input_grad
        if grad_out is None:
            return (None,) * 13
        r = shortcut if lambda_input is None else lambda_input
        if lean.must_replay():
            g = lean.replay(
                lambda *t: MRLALightBranch.reference(*t, norm, keep),
                [lean.tail_reference(pre, shortcut, scale, shift), r, gate, v_weight, lambda_t, nw, nb],
                [grad_out], (needs[0], needs[2] if lambda_input is None else needs[12]) + needs[5:10])
            g_short, g_lambda_input = _lambda_grads(g[1], lambda_input)
            return (g[0], None, g_short, None, None, *g[2:], None, None, g_lambda_input)
        if ctx.fused:  # incoming gradients may be expanded or strided views: the kernels read dense maps
            g_x, g_r, g_gate, g_v, g_lambda, g_nw, g_nb = native.mrla_light_train_backward(
                pre, shortcut, scale, shift, gate=gate, v_weight=v_weight, lambda_t=lambda_t, keep=keep, mean=mean,
                invstd=invstd, norm_weight=lean.weight_or_ones(norm, mean), batch_stats=ctx.batch_stats,
                grad_out=lean.dense(grad_out), lambda_input=lambda_input)
            g_nw, g_nb = lean.affine_grads(norm, g_nw, g_nb)
        else:
            x = lean.tail_output(pre, shortcut, scale, shift)
            value = depthwise_conv3x3(x, v_weight)
            u = torch.addcmul(value * gate[:, :, None, None], r, lambda_t.to(x.dtype))
            g_u = grad_out if keep is None else grad_out * lean.per_sample(keep, grad_out)
            g_u, g_nw, g_nb = lean.norm_backward(
                norm, g_u, u, mean, invstd, ctx.batch_stats, (True, needs[8], needs[9]))
            g_gate = (g_u * value).sum((2, 3))
            g_lambda = (g_u * r).sum((0, 2, 3)).view_as(lambda_t) if needs[7] else None
            g_r = g_u * lambda_t.to(g_u.dtype)
            g_in, g_v = depthwise_conv3x3_backward(g_u.mul_(gate[:, :, None, None]), x, v_weight, needs[6])
            g_x = g_in.add_(grad_out)
        g_short, g_lambda_input = _lambda_grads(g_r, lambda_input)
        return g_x, None, g_short, None, None, g_gate, g_v, g_lambda, g_nw, g_nb, None, None, g_lambda_input


def _lambda_grads(g_r: Optional[torch.Tensor], lambda_input: Optional[torch.Tensor]
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradient of the map `lambda` scales, as `(shortcut's, lambda_input's)`: it is one of the two."""
    return (g_r, None) if lambda_input is None else (None, g_r)


def _light_input(x, shortcut, gate, v_weight, lambda_t):
    """`gate * DW3(x) + lambda * shortcut`, the input of MRLA-light's BatchNorm."""
    return depthwise_conv3x3(x, v_weight).mul_(gate[:, :, None, None]).addcmul_(shortcut, lambda_t.to(x.dtype))


class MRLABaseBranch(torch.autograd.Function):
    """One MRLA-base step on the tail's output `x`: `V_t = DW3(x)`, `out = x + relu(BN(sum_j w_j V_j)) * keep`.

    The earlier values `V_0..V_{t-1}` come last (`*values`); returns `(out, V_t)`. Keeps the tail's recipe
    for `x`, the earlier values (the carried cache) and per-channel vectors, not `V_t` or the weighted sum:
    backward recomputes them (see `lean`).
    """

    @staticmethod
    def forward(ctx, x, pre, shortcut, scale, shift, weights, v_weight, norm_weight, norm_bias, norm, keep, *values):
        ctx.set_materialize_grads(False)
        fused = native.trainable(x, pre, shortcut, scale, weights, v_weight, *values)
        with torch.autocast(x.device.type, enabled=False):
            if fused:
                attn, value, moments = native.mrla_base_train_values(
                    x, values=list(values), weights=weights, v_weight=v_weight)
                mean, invstd, a, b = lean.fused_norm(norm, attn, moments, keep)
                out = native.affine_residual_(attn, x=x, a=a, b=b, relu=True)
            else:
                value = depthwise_conv3x3(x, v_weight)
                attn = _weighted_sum(value, values, weights)
                mean, invstd = lean.norm_stats(norm, attn)
                a, b = lean.norm_affine(norm, mean, invstd, keep)
                out = attn.mul_(lean._map(a, attn)).add_(lean._map(b, attn)).relu_().add_(x)
        ctx.norm, ctx.fused = norm, fused
        ctx.batch_stats = lean._uses_batch_stats(norm)
        ctx.save_for_backward(
            pre, shortcut, scale, shift, weights, v_weight, mean, invstd, keep, a, b, norm_weight, norm_bias, *values)
        return out, value

    @staticmethod
    def reference(x, weights, v_weight, norm_weight, norm_bias, *values, norm, keep):
        """`(out, V_t)` in differentiable PyTorch ops, without side effects (see `lean.replay`)."""
        value = depthwise_conv3x3(x, v_weight)
        last = len(values)
        attn = value * weights[:, last, :, None, None]
        for j, v in enumerate(values):
            attn = torch.addcmul(attn, v, weights[:, j, :, None, None])
        a, b = lean.norm_reference(norm, attn, norm_weight, norm_bias, keep)
        return torch.relu(torch.addcmul(lean._map(b, attn), attn, lean._map(a, attn))) + x, value

    @staticmethod
    def backward(ctx, grad_out, grad_value):
        pre, shortcut, scale, shift, weights, v_weight, mean, invstd, keep, a, b, nw, nb, *values = ctx.saved_tensors
        norm = ctx.norm
        needs = ctx.needs_input_grad
        if lean.must_replay():
            g = lean.replay(
                lambda *t: MRLABaseBranch.reference(*t, norm=norm, keep=keep),
                [lean.tail_reference(pre, shortcut, scale, shift), weights, v_weight, nw, nb, *values],
                [grad_out, grad_value], (needs[0], needs[5], needs[6], needs[7], needs[8]) + needs[11:])
            return (g[0], None, None, None, None, *g[1:5], None, None, *g[5:])
        if grad_out is None:
            grad_out = torch.zeros_like(pre)
        if ctx.fused:  # incoming gradients may be expanded or strided views: the kernels read dense maps
            g_x, g_weights, g_v, g_nw, g_nb, g_values = native.mrla_base_train_backward(
                pre, shortcut, scale, shift, values=values, weights=weights, v_weight=v_weight, a=a, b=b, keep=keep,
                mean=mean, invstd=invstd, norm_weight=lean.weight_or_ones(norm, mean), batch_stats=ctx.batch_stats,
                grad_out=lean.dense(grad_out), grad_value=lean.dense(grad_value))
            g_nw, g_nb = lean.affine_grads(norm, g_nw, g_nb)
        else:
            x = lean.tail_output(pre, shortcut, scale, shift)
            value = depthwise_conv3x3(x, v_weight)
            attn = _weighted_sum(value, values, weights)
            pre_relu = torch.addcmul(lean._map(b, attn), attn, lean._map(a, attn))
            g_s = torch.ops.aten.threshold_backward(grad_out, pre_relu, 0)
            if keep is not None:
                g_s = g_s.mul_(lean.per_sample(keep, g_s))
            g_s, g_nw, g_nb = lean.norm_backward(
                norm, g_s, attn, mean, invstd, ctx.batch_stats, (True, needs[7], needs[8]))
            last = len(values)
            g_weights = torch.stack([(g_s * v).sum((2, 3)) for v in values + [value]], dim=1)
            g_values = [g_s * weights[:, j, :, None, None] if needs[11 + j] else None for j in range(last)]
            g_value = g_s * weights[:, last, :, None, None]
            if grad_value is not None:
                g_value = g_value.add_(grad_value)
            g_in, g_v = depthwise_conv3x3_backward(g_value, x, v_weight, needs[6])
            g_x = g_in.add_(grad_out)
        return (g_x, None, None, None, None, g_weights, g_v, g_nw, g_nb, None, None, *g_values)


def _weighted_sum(value: torch.Tensor, values: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`sum_j w_j V_j` over the earlier values and this block's `value` (the last weight), a new tensor."""
    last = len(values)
    attn = value * weights[:, last, :, None, None]
    for j, v in enumerate(values):
        attn = attn.addcmul_(v, weights[:, j, :, None, None])
    return attn


class MRLALight(LayerAttnBase):
    """MRLA-light: gated current value plus a channel-scaled shortcut; carries no state."""

    def __init__(
            self,
            channels: int,
            head_dim: int = 32,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(channels, head_dim, drop_path, norm_layer, device=device, dtype=dtype)
        self.scale = 1. / math.sqrt(head_dim)
        # Official init is an unscaled N(0, 1); kept so from-scratch training matches the paper's runs.
        self.lambda_t = nn.Parameter(torch.randn(channels, 1, 1, device=device, dtype=dtype))

    def _gate(self, pooled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-head gate `sigmoid(<Q_h, K_h> / sqrt(d))` of the pooled block output, per channel `[B, C]`."""
        q, k = self._query_key(pooled)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_heads, self.head_dim)
        gate = torch.sigmoid((q * k).sum(-1) * self.scale).to(dtype)
        return per_channel(gate, self.head_dim)

    def forward_reference(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The reference path: `x + DropPath(BN(gate * DW3(x) + lambda * shortcut))` with `norm` and
        `drop_path` as modules. The other paths are held equal to it (see `LayerAttnBase`)."""
        gate = self._gate(x.mean((2, 3)), x.dtype)[:, :, None, None]
        value = self.v(x)
        return x + self.drop_path(self.norm(value * gate + self.lambda_t * shortcut)), state

    @torch.jit.unused
    def forward_lean(
            self,
            tail: lean.Tail,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
            lambda_input: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """`lambda_input`: the map `lambda` scales where it is not the block's shortcut (DLA-light)."""
        gate = self._gate(tail.pooled, tail.x.dtype)
        out = MRLALightBranch.apply(
            *tail.inputs, gate, self.v.weight.to(tail.x.dtype), self.lambda_t, self.norm.weight, self.norm.bias,
            self.norm, keep, lambda_input)
        return out, state

    def forward_folded(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval: `x + BN(gate * V + lambda * r) == x + (scale * gate) * V + (scale * lambda) * r + shift`;
        with autograd off added to `x` in place. Equal to `forward_reference` in eval mode."""
        gate = self._gate(x.mean((2, 3)), x.dtype)[:, :, None, None]
        value = self.v(x)
        scale, shift = self._fold_norm()
        scale = scale[:, None, None]
        out = torch.addcmul(x, value, gate * scale) if torch.is_grad_enabled() else x.addcmul_(value, gate * scale)
        return out.addcmul_(shortcut, self.lambda_t * scale).add_(shift[:, None, None]), state

    @torch.jit.unused
    def forward_native(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """`forward_folded` as one fused CPU op, in place on `x`."""
        scale, shift = self._fold_norm()
        out = native.mrla_light_(
            x,
            shortcut=shortcut,
            v_weight=self.v.weight,
            q_weight=self.q.weight,
            k_weight=self.k.weight,
            lambda_t=self.lambda_t,
            norm_scale=scale,
            norm_shift=shift,
            head_dim=self.head_dim,
            attn_scale=self.scale,
        )
        return out, state

    @torch.jit.unused
    def _native_inputs(self, shortcut: torch.Tensor, state: List[torch.Tensor]) -> List[torch.Tensor]:
        return [shortcut]

    @torch.jit.unused
    def _state_len(self, incoming: int) -> int:
        return incoming  # passed through


class MRLABase(LayerAttnBase):
    """MRLA-base: softmax attention over the cached keys / values of the stage's earlier blocks.

    State: `[keys, v_0, ..., v_{T-1}]` with `keys` `[B, T, C]` and one value map per earlier block of
    the stage. Values stay separate tensors (no per-block concatenation or head-major copies); the
    output is a per-channel weighted sum over them.
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            first_in_stage: bool = False,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(channels, head_dim, drop_path, norm_layer, device=device, dtype=dtype)
        self.scale = 1. / math.sqrt(head_dim)
        self.first_in_stage = first_in_stage

    def _weights(
            self,
            pooled: torch.Tensor,
            state: List[torch.Tensor],
            dtype: torch.dtype,
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Append this block's key to the stage cache: the keys `[B, T, C]`, the earlier blocks' values and the
        per-channel softmax weights `[B, T, C]` (in `dtype`) of the query over the keys."""
        g, d = self.num_heads, self.head_dim
        q, k = self._query_key(pooled)
        k = k.unsqueeze(1)
        if self.first_in_stage or len(state) == 0:
            keys = k
            earlier: List[torch.Tensor] = []
        else:
            keys = torch.cat([state[0], k], dim=1)
            earlier = state[1:]
        scores = (q.view(-1, 1, g, d) * keys.view(-1, keys.shape[1], g, d)).sum(-1) * self.scale
        return keys, earlier, per_channel(scores.softmax(dim=1).to(dtype), d)

    def _attend(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Append this block's key and value to the stage cache: the keys `[B, T, C]`, the values and the
        per-channel softmax weights `[B, T, C]` of the query over the keys."""
        value = self.v(x)
        keys, earlier, weights = self._weights(x.mean((2, 3)), state, value.dtype)
        return keys, earlier + [value], weights

    def forward_reference(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The reference path: `x + DropPath(ReLU(BN(sum_j w_j V_j)))` with `norm` and `drop_path` as modules.
        The other paths are held equal to it (see `LayerAttnBase`)."""
        keys, values, weights = self._attend(x, state)
        attn = values[0] * weights[:, 0, :, None, None]
        for j in range(1, len(values)):
            attn = attn.addcmul(values[j], weights[:, j, :, None, None])
        return x + self.drop_path(torch.relu(self.norm(attn))), [keys] + values

    @torch.jit.unused
    def forward_lean(
            self,
            tail: lean.Tail,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        keys, earlier, weights = self._weights(tail.pooled, state, tail.x.dtype)
        out, value = MRLABaseBranch.apply(
            *tail.inputs, weights, self.v.weight.to(tail.x.dtype), self.norm.weight, self.norm.bias, self.norm, keep,
            *earlier)
        return out, [keys] + earlier + [value]

    def forward_folded(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval: `relu(BN(sum_j w_j V_j)) == relu(shift + sum_j (scale * w_j) V_j)`, summed in one buffer; with
        autograd off added to `x` in place. Equal to `forward_reference` in eval mode."""
        keys, values, weights = self._attend(x, state)
        scale, shift = self._fold_norm()
        weights = weights * scale
        out = values[0] * weights[:, 0, :, None, None]
        for j in range(1, len(values)):
            out = out.addcmul_(values[j], weights[:, j, :, None, None])
        out = out.add_(shift[:, None, None])
        out = x + torch.relu(out) if torch.is_grad_enabled() else x.add_(out.relu_())
        return out, [keys] + values

    @torch.jit.unused
    def forward_native(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """`forward_folded` as one fused CPU op, in place on `x` (this block's value goes to a new map)."""
        keys, earlier = (None, []) if self.first_in_stage or len(state) == 0 else (state[0], state[1:])
        scale, shift = self._fold_norm()
        value = torch.empty_like(x)
        keys = native.mrla_base_(
            x,
            value=value,
            values=earlier,
            keys=keys,
            v_weight=self.v.weight,
            q_weight=self.q.weight,
            k_weight=self.k.weight,
            norm_scale=scale,
            norm_shift=shift,
            head_dim=self.head_dim,
            attn_scale=self.scale,
        )
        return x, [keys] + earlier + [value]

    @torch.jit.unused
    def _native_inputs(self, shortcut: torch.Tensor, state: List[torch.Tensor]) -> List[torch.Tensor]:
        return state

    @torch.jit.unused
    def _state_len(self, incoming: int) -> int:
        earlier = 0 if self.first_in_stage or incoming == 0 else incoming - 1
        return 1 + earlier + 1  # keys, the earlier values, this block's value
