"""Channel gates on a residual branch: squeeze-and-excitation (SE), ECA and DIANet's stage-shared LSTM cell.

All three scale the residual branch of a block per channel, between its last norm and the residual add,
`x = act(branch * gate + shortcut)`, the place of a `block_pre_residual` module (contract `(x, state) ->
(x, state)`):

* `SEGate`: `gate = sigmoid(W2 relu(W1 GAP(branch)))`, W1: C -> C / r, W2: C / r -> C, no biases (Hu et al.).
* `EcaGate`: `gate = sigmoid(conv1d_k(GAP(branch)))` along the channel axis, k adaptive in C: timm's
  `EcaModule(C)` (Wang et al.).
* `DIAGate`: `gate = h`, the hidden state of an LSTM-like cell that one stage's blocks share (DIANet, Huang et
  al.): each block steps the cell once on GAP(branch). The cell's weights belong to the stage (`DIACell`,
  its entry unit), and its `(h, c)` start at zero in every stage.

TorchScript passes no modules between units, so the stage's cell travels to its blocks as tensors: the entry
unit starts the stage's carried state as `[h, c, *cell weights]`, and each gate steps the cell with the weights
it finds there (`dia_cell_step`) and hands `[h', c', *cell weights]` on. The maths, placement and every decision
are in docs/design/channel_gates.md.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import EcaModule

from . import lean, native
from ._checks import check_int
from ._common import eca_channel_conv

__all__ = ['SEGate', 'EcaGate', 'DIACell', 'DIAGate', 'dia_cell_step']

State = List[torch.Tensor]


def _check_reduced(owner: str, chs: int, reduction: int) -> None:
    # The gate squeezes C channels to C // reduction: at least one must remain.
    check_int(owner, 'chs', chs)
    check_int(owner, 'reduction', reduction)
    if chs < reduction:
        raise ValueError(f'{owner}: chs must be an integer >= {reduction} (C // {reduction} channels in the '
                         f'squeeze), got {chs!r}')


class _PlaneGate(nn.Module):
    """A gate `g [B, C]` of the pooled residual branch that scales it per (sample, channel): `x * g`.

    Subclasses define the gate as a function of explicit tensors, `gate(pooled, state, weights) -> (g, head)`
    (`head` replaces the first entries of the carried state), and name their `weights`. The block hands its whole
    tail (last BatchNorm, gate, residual add, ReLU) to `forward_tail` where the fused CPU kernels run: one pass
    for the norm's statistics and the pooled branch, one for the output, and in training the memory-lean
    `GatedTail` Function; everywhere else the block runs `forward`.
    """

    def gate_weights(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def gate(self, pooled: torch.Tensor, state: State, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, State]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        g, head = self.gate(x.mean((2, 3)), state, self.gate_weights())
        return x * g[:, :, None, None], head + state[len(head):]

    @torch.jit.unused
    def tail_usable(self, pre: torch.Tensor, shortcut: torch.Tensor, state: State) -> bool:
        """Whether `forward_tail` can run: the fused kernels, in inference or on the lean training path."""
        if native.usable(pre, shortcut):
            return True
        return lean.usable(pre, shortcut) and native.trainable(pre, shortcut)

    @torch.jit.unused
    def forward_tail(self, pre: torch.Tensor, norm: nn.BatchNorm2d, shortcut: torch.Tensor,
                     keep: Optional[torch.Tensor], state: State) -> Tuple[torch.Tensor, State]:
        """`relu(norm(pre) * gate * keep + shortcut)` and the new state, on the fused kernels."""
        weights = self.gate_weights()
        if torch.is_grad_enabled():
            return lean.gated_tail(pre, norm, shortcut, keep, self.gate, state, weights)
        x, head, _ = lean.gated_tail_forward(pre, norm, shortcut, keep, self.gate, state, weights)
        return x, head + state[len(head):]


class SEGate(_PlaneGate):
    """Squeeze-and-excitation of a residual branch (the official CIFAR `SELayer`, bias-free linears).

    Linears keep PyTorch's default init (the official one: the trunk's init touches only convs and norms).
    """

    def __init__(self, chs: int, reduction: int = 16, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_reduced('SEGate', chs, reduction)
        self.fc1 = nn.Linear(chs, chs // reduction, bias=False, **dd)
        self.fc2 = nn.Linear(chs // reduction, chs, bias=False, **dd)

    def gate_weights(self) -> List[torch.Tensor]:
        return [self.fc1.weight, self.fc2.weight]

    def gate(self, pooled: torch.Tensor, state: State, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, State]:
        head: State = []
        return torch.sigmoid(F.linear(F.relu(F.linear(pooled, weights[0])), weights[1])), head


class EcaGate(_PlaneGate):
    """ECA of a residual branch: timm's `EcaModule(C)` (adaptive kernel, sigmoid gate; `eca.conv` holds the
    filter) as a pre-residual module."""

    def __init__(self, chs: int, device=None, dtype=None):
        super().__init__()
        check_int('EcaGate', 'chs', chs)
        self.eca = EcaModule(chs, device=device, dtype=dtype)

    def gate_weights(self) -> List[torch.Tensor]:
        return [self.eca.conv.weight]

    def gate(self, pooled: torch.Tensor, state: State, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, State]:
        # `EcaModule.forward`'s maths with explicit shapes (its `view(B, 1, -1)` fails on an empty batch), the
        # channel conv through the package's (a oneDNN conv1d on `[B, 1, C]` costs more than the block's BN).
        head: State = []
        return self.eca.gate(eca_channel_conv(pooled, weights[0]).squeeze(1)), head


class _CellMlp(nn.Module):
    """One of the cell's two gate maps: Linear C -> C / 4, ReLU, Linear C / 4 -> 4C (both with bias)."""

    def __init__(self, chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Linear(chs, chs // 4, **dd)
        self.fc2 = nn.Linear(chs // 4, 4 * chs, **dd)

    def tensors(self) -> List[torch.Tensor]:
        return [self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias]


def _mlp(x: torch.Tensor, w: List[torch.Tensor]) -> torch.Tensor:
    return F.linear(F.relu(F.linear(x, w[0], w[1])), w[2], w[3])


def dia_cell_step(p: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weights: List[torch.Tensor]
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of DIANet's cell on the pooled branch `p` `[B, C]` with state `h`, `c` `[B, C]`.

    `weights`: the input map's `fc1.weight, fc1.bias, fc2.weight, fc2.bias`, then the hidden map's. The gates
    are split in the order input, forget, cell, output; the new hidden state is `o * sigmoid(c')` (the official
    cell's choice, not an LSTM's `tanh`), so it is a gate in (0, 1).
    """
    gates = _mlp(p, weights[:4]) + _mlp(h, weights[4:8])
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.sigmoid(c)
    return h, c


class DIACell(nn.Module):
    """DIANet's cell of one stage, the stage's entry unit: it owns the weights that every block of the stage
    shares and starts the stage's state `[h, c, *weights]` with `h = c = 0` (`(x, state, shared) -> (x, state)`;
    the state of the previous stage is dropped). The blocks' `DIAGate`s step it."""

    def __init__(self, chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_reduced('DIACell', chs, 4)
        self.chs = chs
        self.ih = _CellMlp(chs, **dd)
        self.hh = _CellMlp(chs, **dd)

    def forward(self, x: torch.Tensor, state: State, shared: List[torch.Tensor]) -> Tuple[torch.Tensor, State]:
        zeros = x.new_zeros(x.shape[0], self.chs)
        return x, [zeros, zeros] + self.ih.tensors() + self.hh.tensors()


class DIAGate(_PlaneGate):
    """DIANet's gate of one block: steps the stage's cell (`dia_cell_step`) on GAP(branch) and scales the branch
    by the new hidden state. No parameters of its own: the cell's weights come with the state `[h, c, *weights]`
    that the stage's `DIACell` started."""

    def gate_weights(self) -> List[torch.Tensor]:
        none: List[torch.Tensor] = []
        return none

    def gate(self, pooled: torch.Tensor, state: State, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, State]:
        h, c = dia_cell_step(pooled, state[0], state[1], state[2:])
        return h, [h, c]
