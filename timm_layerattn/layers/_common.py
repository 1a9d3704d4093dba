"""Small helpers shared by the layer-attention modules."""
import math
from typing import List, Tuple

import torch
import torch.nn as nn

__all__ = ['eca_kernel_size', 'ChannelConv1d', 'per_channel', 'LayerAttnBase']


def eca_kernel_size(channels: int, gamma: int = 2, beta: int = 1) -> int:
    """Odd 1-D kernel size from the ECA rule, as used by every official KCLA / MRLA module.

    `math.log(channels, 2)` (not `log2`) keeps the official rounding for non-power-of-two widths.
    """
    t = int(abs((math.log(channels, 2) + beta) / gamma))
    return t if t % 2 else t + 1


class ChannelConv1d(nn.Conv1d):
    """ECA-style k-tap filter sliding along the channel axis of a pooled `[B, C]` descriptor.

    Stores a `[1, 1, k]` weight exactly like the official `Conv1d(1, 1, k)` modules.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        k = eca_kernel_size(channels)
        super().__init__(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x.unsqueeze(1), self.weight, self.bias).squeeze(1)


def per_channel(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Expand per-head values `[B, g]` (or `[B, T, g]`) to per-channel values along the last dim."""
    return t.repeat_interleave(head_dim, dim=-1)


class LayerAttnBase(nn.Module):
    """Common parts of a per-block layer-attention module.

    Subclasses implement `forward(x, shortcut, state) -> (out, state)`, where `x` is the block output
    (after its final activation), `shortcut` the block's residual input and `state` the carried
    per-network attention state (a list of tensors whose meaning belongs to the strategy).

    In inference the attention BatchNorm is a per-channel affine; `_fold_norm()` returns it so the
    per-sample gates can be merged with it and the tail done in fewer full-size memory passes.
    """
    def _can_fold_norm(self) -> bool:
        """True when the branch is deterministic and its norm uses running statistics."""
        norm = self.norm
        return not self.training and not norm.training and norm.running_var is not None

    def _fold_norm(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel `(scale, shift)` of the eval-mode BatchNorm, shapes `[C]`."""
        norm = self.norm
        mean, var = norm.running_mean, norm.running_var
        assert mean is not None and var is not None
        scale = torch.rsqrt(var + norm.eps)
        weight, bias = norm.weight, norm.bias
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale, shift

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        raise NotImplementedError
