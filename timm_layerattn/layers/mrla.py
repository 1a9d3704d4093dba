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
from typing import List, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import register_notrace_function

from . import native
from ._common import LayerAttnBase, depthwise_conv3x3, per_channel

__all__ = ['MRLALight', 'MRLABase', 'mrla_light_inference', 'mrla_base_inference']


@register_notrace_function
def mrla_light_inference(
        x: torch.Tensor,
        shortcut: torch.Tensor,
        weight: torch.Tensor,
        gate_scale: torch.Tensor,
        shortcut_scale: torch.Tensor,
        shift: torch.Tensor,
) -> torch.Tensor:
    """`x + gate_scale * DW3(x) + shortcut_scale * shortcut + shift`: MRLA-light with its eval BatchNorm folded in.

    `gate_scale` is `[B, C]`, `shortcut_scale` and `shift` `[C]`. With autograd off the result overwrites `x`
    (the block output, which nothing else holds); the fused CPU kernel computes it where it applies.
    """
    if not torch.jit.is_scripting():
        if native.usable(x, shortcut, weight):
            return torch.ops.timm_layerattn.mrla_light_(
                x, shortcut, weight, gate_scale.contiguous(), shortcut_scale.contiguous(), shift.contiguous())
    value = depthwise_conv3x3(x, weight)
    gate_scale = gate_scale[:, :, None, None]
    out = torch.addcmul(x, value, gate_scale) if torch.is_grad_enabled() else x.addcmul_(value, gate_scale)
    return out.addcmul_(shortcut, shortcut_scale[:, None, None]).add_(shift[:, None, None])


@register_notrace_function
def mrla_base_inference(
        x: torch.Tensor,
        values: List[torch.Tensor],
        weights: torch.Tensor,
        weight: torch.Tensor,
        shift: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(x + relu(shift + sum_j weights[:, j] * V_j), V_t)` with `V_t = DW3(x)` appended to the earlier `values`.

    MRLA-base with its eval BatchNorm folded into `weights` (`[B, T, C]`). With autograd off the result
    overwrites `x`; the fused CPU kernel computes it where it applies.
    """
    if not torch.jit.is_scripting():
        if native.usable(x, weight, *values):
            value = torch.empty_like(x)
            out = torch.ops.timm_layerattn.mrla_base_(x, value, values, weights.contiguous(), weight, shift.contiguous())
            return out, value
    value = depthwise_conv3x3(x, weight)
    values = values + [value]
    out = values[0] * weights[:, 0, :, None, None]
    for j in range(1, len(values)):
        out = out.addcmul_(values[j], weights[:, j, :, None, None])
    out = out.add_(shift[:, None, None])
    out = x + torch.relu(out) if torch.is_grad_enabled() else x.add_(out.relu_())
    return out, value


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

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        pooled = x.mean((2, 3))
        q, k = self._query_key(pooled)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_heads, self.head_dim)
        gate = per_channel(torch.sigmoid((q * k).sum(-1) * self.scale), self.head_dim)
        if self._can_fold_norm():
            # x + BN(gate * V + lambda * r) == x + (scale * gate) * V + (scale * lambda) * r + shift
            scale, shift = self._fold_norm()
            out = mrla_light_inference(
                x, shortcut, self.v.weight, gate * scale, self.lambda_t.view(-1) * scale, shift)
        else:
            value = self.v(x)
            out = x + self.drop_path(self.norm(value * gate[:, :, None, None] + self.lambda_t * shortcut))
        return out, state


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

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        g, d = self.num_heads, self.head_dim
        pooled = x.mean((2, 3))
        q, k = self._query_key(pooled)
        k = k.unsqueeze(1)
        if self.first_in_stage or len(state) == 0:
            keys = k
            earlier: List[torch.Tensor] = []
        else:
            keys = torch.cat([state[0], k], dim=1)
            earlier = state[1:]
        num_tokens = len(earlier) + 1

        scores = (q.view(-1, 1, g, d) * keys.view(-1, num_tokens, g, d)).sum(-1) * self.scale
        weights = per_channel(scores.softmax(dim=1), d)  # [B, T, C]
        if self._can_fold_norm():
            # relu(BN(sum_j w_j V_j)) == relu(shift + sum_j (scale * w_j) V_j) in inference
            scale, shift = self._fold_norm()
            out, value = mrla_base_inference(x, earlier, weights * scale, self.v.weight, shift)
            values = earlier + [value]
        else:
            values = earlier + [self.v(x)]
            attn = values[0] * weights[:, 0, :, None, None]
            for j in range(1, num_tokens):
                attn = attn.addcmul(values[j], weights[:, j, :, None, None])
            out = x + self.drop_path(torch.relu(self.norm(attn)))
        return out, [keys] + values
