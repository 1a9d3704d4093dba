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

from . import native
from ._common import LayerAttnBase, per_channel

__all__ = ['MRLALight', 'MRLABase']


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

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head gate `sigmoid(<Q_h, K_h> / sqrt(d))` of the pooled `x`, per channel `[B, C, 1, 1]`."""
        q, k = self._query_key(x.mean((2, 3)))
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_heads, self.head_dim)
        gate = torch.sigmoid((q * k).sum(-1) * self.scale).to(x.dtype)
        return per_channel(gate, self.head_dim)[:, :, None, None]

    def forward_reference(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The reference path: `x + DropPath(BN(gate * DW3(x) + lambda * shortcut))` with `norm` and
        `drop_path` as modules. The other paths are held equal to it (see `LayerAttnBase`)."""
        gate = self._gate(x)
        value = self.v(x)
        return x + self.drop_path(self.norm(value * gate + self.lambda_t * shortcut)), state

    def forward_folded(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Eval: `x + BN(gate * V + lambda * r) == x + (scale * gate) * V + (scale * lambda) * r + shift`;
        with autograd off added to `x` in place. Equal to `forward_reference` in eval mode."""
        gate = self._gate(x)
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

    def _attend(
            self,
            x: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Append this block's key and value to the stage cache: the keys `[B, T, C]`, the values and the
        per-channel softmax weights `[B, T, C]` of the query over the keys."""
        g, d = self.num_heads, self.head_dim
        q, k = self._query_key(x.mean((2, 3)))
        k = k.unsqueeze(1)
        value = self.v(x)
        if self.first_in_stage or len(state) == 0:
            keys = k
            values = [value]
        else:
            keys = torch.cat([state[0], k], dim=1)
            values = state[1:] + [value]
        scores = (q.view(-1, 1, g, d) * keys.view(-1, len(values), g, d)).sum(-1) * self.scale
        return keys, values, per_channel(scores.softmax(dim=1).to(value.dtype), d)

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
