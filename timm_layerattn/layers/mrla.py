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

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not torch.jit.is_scripting():
            if self._can_fold_norm() and native.usable(x, shortcut):
                return self._forward_native(x, shortcut), state
        pooled = x.mean((2, 3))
        q, k = self._query_key(pooled)
        q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_heads, self.head_dim)
        gate = per_channel(torch.sigmoid((q * k).sum(-1) * self.scale), self.head_dim)[:, :, None, None]
        value = self.v(x)
        if self._can_fold_norm():
            # x + BN(gate * V + lambda * r) == x + (scale * gate) * V + (scale * lambda) * r + shift
            scale, shift = self._fold_norm()
            scale = scale[:, None, None]
            out = torch.addcmul(x, value, gate * scale) if torch.is_grad_enabled() else x.addcmul_(value, gate * scale)
            out = out.addcmul_(shortcut, self.lambda_t * scale).add_(shift[:, None, None])
        else:
            out = x + self.drop_path(self.norm(value * gate + self.lambda_t * shortcut))
        return out, state

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        scale, shift = self._fold_norm()
        return torch.ops.timm_layerattn.mrla_light_(
            x, shortcut, self.v.weight, self.q.weight, self.k.weight, self.lambda_t, scale, shift,
            self.head_dim, self.scale)


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
        if not torch.jit.is_scripting():
            if self._can_fold_norm() and native.usable(x, *state):
                return self._forward_native(x, state)
        g, d = self.num_heads, self.head_dim
        pooled = x.mean((2, 3))
        q, k = self._query_key(pooled)
        k = k.unsqueeze(1)
        value = self.v(x)
        if self.first_in_stage or len(state) == 0:
            keys = k
            values = [value]
        else:
            keys = torch.cat([state[0], k], dim=1)
            values = state[1:] + [value]
        num_tokens = len(values)

        scores = (q.view(-1, 1, g, d) * keys.view(-1, num_tokens, g, d)).sum(-1) * self.scale
        weights = per_channel(scores.softmax(dim=1), d)  # [B, T, C]
        if self._can_fold_norm():
            # relu(BN(sum_j w_j V_j)) == relu(shift + sum_j (scale * w_j) V_j) in inference
            scale, shift = self._fold_norm()
            weights = weights * scale
            out = values[0] * weights[:, 0, :, None, None]
            for j in range(1, num_tokens):
                out = out.addcmul_(values[j], weights[:, j, :, None, None])
            out = out.add_(shift[:, None, None])
            out = x + torch.relu(out) if torch.is_grad_enabled() else x.add_(out.relu_())
        else:
            attn = values[0] * weights[:, 0, :, None, None]
            for j in range(1, num_tokens):
                attn = attn.addcmul(values[j], weights[:, j, :, None, None])
            out = x + self.drop_path(torch.relu(self.norm(attn)))
        return out, [keys] + values

    @torch.jit.unused
    def _forward_native(self, x: torch.Tensor, state: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        keys, earlier = (None, []) if self.first_in_stage or len(state) == 0 else (state[0], state[1:])
        scale, shift = self._fold_norm()
        value = torch.empty_like(x)
        keys = torch.ops.timm_layerattn.mrla_base_(
            x, value, earlier, keys, self.v.weight, self.q.weight, self.k.weight, scale, shift,
            self.head_dim, self.scale)
        return x, [keys] + earlier + [value]
