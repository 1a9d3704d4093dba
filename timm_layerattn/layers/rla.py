"""Recurrent layer aggregation (RLA-Net, Zhao et al., NeurIPS 2021): a small hidden stream `h` that runs
beside a ResNet's features and is read by every block.

For block t of stage s, with input x_{t-1} and output x_t (after its residual add and ReLU):

    x_t = block_t(concat(x_{t-1}, h_{t-1}))          the block's first conv reads both; its residual keeps x
    h_t = W_rec,s * tanh(BN_t(P(h_{t-1}) + W_out,s x_t))

`W_out,s` (1x1, C_s -> k) and `W_rec,s` (3x3, k -> k) are shared by all blocks of stage s; `BN_t` is the
block's own; `P` is a 2x2 average pool at the first block of a strided stage (else the identity). `h_0 = 0`
at the stem's resolution; the classifier reads `concat(x_T, relu(BN(h_T)))`.

TorchScript passes no modules between units, so a stage's two shared convs travel to its blocks as tensors:
the stage's entry unit (`RLAStageConvs`) makes the carried state `[h, W_out, W_rec]`, each block's concat
(`RLAConcat`) reads `h`, and each block's update (`RLAUpdate`) applies the stage's weights and hands the
state on. The maths, the official code's quirks and every decision are in docs/design/rla.md.
"""
from typing import List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_int

__all__ = ['RLAStageConvs', 'RLAConcat', 'RLAUpdate', 'RLANeck']

State = List[torch.Tensor]


class RLAStageConvs(nn.Module):
    """A stage's entry unit: owns the two convs its blocks share and puts them into the carried state.

    `(x, state, shared) -> (x, [h, W_out, W_rec])`; the stream starts at zero (`h_0`) when the state is empty
    (the first stage), else `h` comes from the previous stage at its resolution.
    """

    def __init__(self, chs: int, rla_chs: int = 32, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_int('RLAStageConvs', 'chs', chs)
        self.rla_chs = check_int('RLAStageConvs', 'rla_chs', rla_chs)
        self.conv_out = nn.Conv2d(chs, rla_chs, 1, bias=False, **dd)
        self.recurrent_conv = nn.Conv2d(rla_chs, rla_chs, 3, padding=1, bias=False, **dd)

    def forward(self, x: torch.Tensor, state: State, shared: State) -> Tuple[torch.Tensor, State]:
        if len(state) == 0:
            h = x.new_zeros((x.shape[0], self.rla_chs, x.shape[2], x.shape[3]))
        else:
            h = state[0]
        return x, [h, self.conv_out.weight, self.recurrent_conv.weight]


class RLAConcat(nn.Module):
    """A block's conv input: `concat(x, h)` (the trunk widens the block's first conv by `extra_chs`)."""

    def __init__(self, rla_chs: int = 32):
        super().__init__()
        self.extra_chs = check_int('RLAConcat', 'rla_chs', rla_chs)

    def forward(self, x: torch.Tensor, state: State) -> torch.Tensor:
        return torch.cat((x, state[0].to(x.dtype)), dim=1)


class RLAUpdate(nn.Module):
    """A block's stream update on its output, `(x, shortcut, state) -> (x, state)`:
    `h = W_rec * tanh(BN(P(h) + W_out x))` with the stage's weights from the state; `x` is returned unchanged.

    Args:
        rla_chs: Width k of the stream.
        pool: Stride of the 2-D average pool `P` of the incoming `h` (the block's stride; 1 for none). The pool
            rounds up like the block's strided convs, so odd maps keep their sizes matched.
    """

    def __init__(self, rla_chs: int = 32, pool: int = 1, norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 device=None, dtype=None):
        super().__init__()
        check_int('RLAUpdate', 'rla_chs', rla_chs)
        self.pool = check_int('RLAUpdate', 'pool', pool)
        self.bn = norm_layer(rla_chs, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        h, w_out, w_rec = state[0], state[1], state[2]
        if self.pool > 1:
            h = F.avg_pool2d(h, self.pool, self.pool, ceil_mode=True, count_include_pad=False)
        y = F.conv2d(x, w_out).add_(h)  # in place on the conv's own output (its backward does not read it)
        h = F.conv2d(torch.tanh(self.bn(y)), w_rec, padding=1)
        # A traced stage's output is its last node (timm's fx feature extractor): end on `x` (a view, no copy).
        return x.view_as(x), [h, w_out, w_rec]


class RLANeck(nn.Module):
    """The classifier's input: `concat(x_T, relu(BN(h_T)))`.

    Reads the trunk's neck input, the feature levels followed by the final carried state (`[h, W_out, W_rec]`).
    """

    def __init__(self, num_levels: int, chs: int, rla_chs: int = 32, norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 device=None, dtype=None):
        super().__init__()
        self.num_levels = check_int('RLANeck', 'num_levels', num_levels)
        check_int('RLANeck', 'chs', chs)
        check_int('RLANeck', 'rla_chs', rla_chs)
        self.bn = norm_layer(rla_chs, device=device, dtype=dtype)
        self.num_features = chs + rla_chs

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x, h = feats[self.num_levels - 1], feats[self.num_levels]
        return torch.cat((x, F.relu(self.bn(h)).to(x.dtype)), dim=1)
