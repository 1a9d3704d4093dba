"""Dynamic Layer Attention (DLA), light and base forms, on MRLA's modules.

Paper: `Strengthening Layer Interaction via Dynamic Layer Attention` (Wang et al., IJCAI 2024; code:
tunantu/Dynamic-Layer-Attention, CIFAR copies in bgx666/KCLA). Each stage owns one *dynamic sharing unit*
(DSU), an LSTM-like cell without output gate (`h = sigmoid(c)`) that reads the pooled output of every block of
the stage and then gates what the layer attention reads of earlier layers:

* DLA-light: MRLA-light whose stand-in for the previous attention output, the block's shortcut `r`, is first
  refreshed by the DSU: `r' = r * DSU(GAP(r)) + DW3_stage(r)`.
* DLA-base: MRLA-base whose cached keys and values of the stage's earlier blocks are re-weighted by the DSU
  before every block's softmax attention (the re-weighting compounds from block to block).

TorchScript cannot pass modules between units, so the stage's entry unit (`DynamicSharingUnit`, the
trunk's `layerS.attn_in`) starts the carried state as `[h, c, *DSU weights(, excite weight)]` and the block
modules read the weights from it. The maths and every decision: docs/design/dynamic_layer_attention.md.
"""
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from . import lean, native
from ._checks import check_bool, check_int
from ._common import DepthwiseConv3x3, depthwise_conv3x3, per_channel
from .mrla import MRLABase, MRLABaseBranch, MRLALight, _weighted_sum

__all__ = ['DynamicSharingUnit', 'DynamicLALight', 'DynamicLABase', 'dsu_step', 'DSU_STATE']

# The entries a stage's state starts with: h, c and the DSU's eight weights (w_ih and w_hh, each
# Linear -> ReLU -> Linear with biases); DLA-light appends the stage's excite weight.
DSU_STATE = 10


def _mlp(u: torch.Tensor, w: List[torch.Tensor]) -> torch.Tensor:
    """`Linear(w[2], w[3])(ReLU(Linear(w[0], w[1])(u)))` over the last dim of `u`."""
    return F.linear(F.relu(F.linear(u, w[0], w[1])), w[2], w[3])


def dsu_step(
        u: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
        weights: List[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One DSU step: `(i, f, g) = f_ih(u) + f_hh(h)`, `c' = sigmoid(f) c + sigmoid(i) tanh(g)`, `h' = sigmoid(c')`.

    `u` is `[..., C]`; `h` and `c` broadcast against it (a `[B, 1, C]` state gates `[B, T, C]` inputs at once).
    `weights` are the eight tensors of `DynamicSharingUnit.weights()`; `u` and `h` are cast to their dtype (the
    cached keys are float32 in a half-precision model).
    """
    dtype = weights[0].dtype
    z = _mlp(u.to(dtype), weights[:4]) + _mlp(h.to(dtype), weights[4:8])
    i, f, g = z.chunk(3, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(c), c


def _gate_state(h: torch.Tensor, c: torch.Tensor, batch_coupled: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The state the gate step starts from: each sample's own, or (the official code) the first sample's for
    every sample."""
    if batch_coupled:
        return h[:1], c[:1]
    return h, c


def _refresh_reference(r: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """DLA-light's refreshed shortcut `r * gate + DW3_stage(r)` (`gate` `[B, C]`) in PyTorch ops."""
    return torch.addcmul(depthwise_conv3x3(r, weight), r, gate[:, :, None, None])


class ShortcutRefresh(torch.autograd.Function):
    """`_refresh_reference` on the fused CPU kernels (float32 contiguous CPU tensors only): one pass forward, one
    backward with the conv's transpose and weight gradient done plane by plane; keeps `r`, which the block keeps
    anyway."""

    @staticmethod
    def forward(ctx, r, gate, weight):
        ctx.save_for_backward(r, gate, weight)
        return native.dw_scale_add(r, m=gate, w=weight)

    @staticmethod
    def backward(ctx, grad):
        r, gate, weight = ctx.saved_tensors
        if lean.must_replay():
            return tuple(lean.replay(
                lambda *t: (_refresh_reference(*t),), [r, gate, weight], [grad], ctx.needs_input_grad))
        return native.dw_scale_add_backward(lean.dense(grad), r, m=gate, w=weight)


@register_notrace_function
def refresh_shortcut(r: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`r * gate + DW3_stage(r)` in the module path: the fused op where `native.usable` (inference), else PyTorch
    ops. One graph node under fx, so a traced model dispatches at run time as eager does, bit for bit."""
    if not torch.jit.is_scripting():
        if native.usable(r, gate, weight):
            return native.dw_scale_add(r, m=gate, w=weight)
    return _refresh_reference(r, gate, weight)


def _lean_refresh(r: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`r * gate + DW3_stage(r)` in the memory-lean path: the fused Function where its kernels run, else PyTorch
    ops."""
    if native.trainable(r, gate, weight):
        return ShortcutRefresh.apply(r, gate, weight)
    return _refresh_reference(r, gate, weight)


class DynamicSharingUnit(nn.Module):
    """A stage's dynamic sharing unit, as the stage's entry unit `(x, state, shared) -> (x, state)`.

    Owns the cell's weights (`w_ih`, `w_hh`: `Linear(C, C / reduction) -> ReLU -> Linear(., 3C)`) and, for
    DLA-light, the stage's depth-wise `excite` conv; starts the stage's state afresh as `[h, c, *weights]` with
    `h = c = 0` (the previous stage's state is dropped, as in the official code).
    """

    def __init__(self, channels: int, reduction: int = 4, excite: bool = False, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        owner = type(self).__name__
        check_int(owner, 'channels', channels)
        check_int(owner, 'reduction', reduction)
        check_bool(owner, 'excite', excite)
        if reduction > channels:
            raise ValueError(f'{owner}: reduction must be at most channels ({channels}), got {reduction}')
        self.channels = channels
        hidden = channels // reduction
        self.w_ih = nn.Sequential(nn.Linear(channels, hidden, **dd), nn.ReLU(), nn.Linear(hidden, 3 * channels, **dd))
        self.w_hh = nn.Sequential(nn.Linear(channels, hidden, **dd), nn.ReLU(), nn.Linear(hidden, 3 * channels, **dd))
        self.excite = DepthwiseConv3x3(channels, **dd) if excite else None

    def weights(self) -> List[torch.Tensor]:
        """The tensors the stage's block modules read: the cell's eight, then the excite weight if any."""
        out = [self.w_ih[0].weight, self.w_ih[0].bias, self.w_ih[2].weight, self.w_ih[2].bias,
               self.w_hh[0].weight, self.w_hh[0].bias, self.w_hh[2].weight, self.w_hh[2].bias]
        if self.excite is not None:
            out.append(self.excite.weight)
        return out

    def forward(self, x: torch.Tensor, state: List[torch.Tensor], shared: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        zeros = x.new_zeros(x.shape[0], self.channels)
        return x, [zeros, zeros] + self.weights()


class _DSUBranch(nn.Module):
    """What DLA-light and DLA-base share: the gate-step rule and where the DSU's tensors end in the state."""

    def __init__(self, batch_coupled_gate: bool):
        super().__init__()
        check_bool(type(self).__name__, 'batch_coupled_gate', batch_coupled_gate)
        self.batch_coupled_gate = batch_coupled_gate
        self.dsu_state = DSU_STATE  # TorchScript reads no module-level ints


class DynamicLALight(_DSUBranch):
    """DLA-light on a block's output: MRLA-light (`mrla`) with the shortcut refreshed by the stage's DSU.

    `(x, shortcut, state) -> (x, state)`, state `[h, c, *DSU weights, excite weight]`:

        h, c = DSU(GAP(x), h, c);  m = DSU(GAP(r), h, c).h;  r' = r * m + DW3_stage(r)
        out = MRLA-light(x, r') = x + DropPath(BN(gate * DW3(x) + lambda * r'))

    MRLA-light runs by its own dispatch (fused kernel, folded norm, reference); in training the block hands its
    tail to `forward_tail` (MRLA-light's memory-lean Function).
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            drop_path: float = 0.,
            batch_coupled_gate: bool = False,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(batch_coupled_gate)
        self.mrla = MRLALight(channels, head_dim, drop_path, norm_layer, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        h, c, gate = self._unit_steps(x.mean((2, 3)), shortcut, state)
        refreshed = refresh_shortcut(shortcut, gate, state[self.dsu_state])
        x, _ = self.mrla(x, refreshed, [])
        return x, [h, c] + state[2:]

    def _unit_steps(self, pooled: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The unit's two steps: on the block output's descriptor `pooled` (the new `h`, `c`), then on the
        shortcut's from that state (the refresh gate `m`)."""
        weights = state[2:self.dsu_state]
        h, c = dsu_step(pooled, state[0], state[1], weights)
        h0, c0 = _gate_state(h, c, self.batch_coupled_gate)
        return h, c, dsu_step(shortcut.mean((2, 3)), h0, c0, weights)[0]

    @torch.jit.unused
    def tail_usable(self, pre: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]) -> bool:
        """Whether the block may hand its tail to `forward_tail` (MRLA-light's memory-lean training path)."""
        return self.mrla.tail_usable(pre, shortcut, [])

    @torch.jit.unused
    def forward_tail(
            self,
            pre: torch.Tensor,
            norm: nn.BatchNorm2d,
            shortcut: torch.Tensor,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Training, memory-lean: the block's tail and MRLA-light as their autograd Functions, the refreshed
        shortcut as the map `lambda` scales; equal to the block's plain tail followed by `forward`."""
        mrla = self.mrla
        tail = lean.block_tail(pre, norm, shortcut, keep)
        h, c, gate = self._unit_steps(tail.pooled, shortcut, state)
        refreshed = _lean_refresh(shortcut, gate, state[self.dsu_state])
        x, _ = mrla.forward_lean(tail, lean.drop_path_keep(mrla.drop_path, tail.x), [], refreshed)
        return x, [h, c] + state[2:]


class DynamicLABase(_DSUBranch):
    """DLA-base on a block's output: MRLA-base (`mrla`) over the stage's cache, re-weighted by the stage's DSU.

    `(x, shortcut, state) -> (x, state)`. State: `[h, c, *DSU weights]` at a stage's first block, then
    `[h, c, *DSU weights, keys, pooled, scale, v_0, ..., v_{T-1}]`: the re-weighted keys `[B, T, C]`, the pooled
    re-weighted values `[B, T, C]`, the product of every DSU gate each value received so far `[B, T, C]`, and
    the values as computed (`DW3(x_j)`). A re-weighted value is `scale_j * v_j`, so the maps are never
    rewritten: the re-weighting costs `[B, T, C]` work per block and folds into the softmax weights.

        h, c = DSU(GAP(x), h, c)
        k_j *= DSU(k_j, h, c).h;  s_j *= DSU(GAP(s_j v_j), h, c).h        (j < t)
        out = x + DropPath(ReLU(BN(sum_j softmax_j(<q, k_j> / sqrt(d)) s_j v_j)))
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            drop_path: float = 0.,
            batch_coupled_gate: bool = False,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__(batch_coupled_gate)
        self.mrla = MRLABase(channels, head_dim, True, drop_path, norm_layer, device=device, dtype=dtype)

    def _weights(
            self,
            pooled: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """Step the DSU on this block's pooled output, re-weight the cache and append this block's key.

        Returns the per-channel attention weights `[B, T + 1, C]` (softmax times the values' scales, in the
        accumulation dtype), the state without this block's pooled value and value (`[h, c, *weights, keys,
        pooled, scale]`, `pooled` and `scale` still `T` long) and the earlier values.
        """
        mrla = self.mrla
        g, d = mrla.num_heads, mrla.head_dim
        weights = state[2:self.dsu_state]
        h, c = dsu_step(pooled, state[0], state[1], weights)
        q, k = mrla._query_key(pooled)
        k = k.unsqueeze(1)
        ones = torch.ones_like(k)
        earlier: List[torch.Tensor] = []
        if len(state) > self.dsu_state:
            keys, vpool, scale = state[self.dsu_state], state[self.dsu_state + 1], state[self.dsu_state + 2]
            t = keys.shape[1]
            h0, c0 = _gate_state(h, c, self.batch_coupled_gate)
            gates = dsu_step(torch.cat([keys, vpool], dim=1), h0.unsqueeze(1), c0.unsqueeze(1), weights)[0]
            gk, gv = gates[:, :t], gates[:, t:]
            vpool, scale = vpool * gv, scale * gv
            keys = torch.cat([keys * gk, k], dim=1)
            earlier = state[self.dsu_state + 3:]
            value_scale = torch.cat([scale, ones], dim=1)
        else:
            keys, vpool, scale, value_scale = k, k[:, :0], k[:, :0], ones
        scores = (q.view(-1, 1, g, d) * keys.view(-1, keys.shape[1], g, d)).sum(-1) * mrla.scale
        attn = per_channel(scores.softmax(dim=1), d) * value_scale
        return attn, [h, c] + weights + [keys, vpool, scale], earlier

    def _append(self, head: List[torch.Tensor], earlier: List[torch.Tensor], value: torch.Tensor) -> List[torch.Tensor]:
        """The next block's state: this block's pooled value (scale 1) appended to the cache, then every value."""
        keys, vpool, scale = head[self.dsu_state], head[self.dsu_state + 1], head[self.dsu_state + 2]
        pooled = value.mean((2, 3)).unsqueeze(1).to(keys.dtype)
        vpool = torch.cat([vpool, pooled], dim=1)
        scale = torch.cat([scale, torch.ones_like(pooled)], dim=1)
        return head[:self.dsu_state + 1] + [vpool, scale] + earlier + [value]

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        mrla = self.mrla
        attn, head, earlier = self._weights(x.mean((2, 3)), state)
        value = mrla.v(x)
        out = torch.relu(mrla.norm(_weighted_sum(value, earlier, attn.to(value.dtype))))
        state = self._append(head, earlier, value)  # before `x`: timm's fx features take a stage's last node
        # Without autograd in eval mode the block output is this forward's own: the branch is added in place. The
        # norm runs as a module (no folding into the weights): the same ops traced by fx as run in eager.
        x = x.add_(out) if not (torch.is_grad_enabled() or self.training) else x + mrla.drop_path(out)
        return x, state

    @torch.jit.unused
    def tail_usable(self, pre: torch.Tensor, shortcut: torch.Tensor, state: List[torch.Tensor]) -> bool:
        """Whether the block may hand its tail to `forward_tail` (MRLA-base's memory-lean training path)."""
        return self.mrla.tail_usable(pre, shortcut, state[self.dsu_state + 3:])

    @torch.jit.unused
    def forward_tail(
            self,
            pre: torch.Tensor,
            norm: nn.BatchNorm2d,
            shortcut: torch.Tensor,
            keep: Optional[torch.Tensor],
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Training, memory-lean: the block's tail and this branch through MRLA-base's autograd Function, with
        the DSU-scaled weights; equal to the block's plain tail followed by `forward`."""
        mrla = self.mrla
        tail = lean.block_tail(pre, norm, shortcut, keep)
        attn, head, earlier = self._weights(tail.pooled, state)
        out, value = MRLABaseBranch.apply(
            *tail.inputs, attn.to(tail.x.dtype), mrla.v.weight.to(tail.x.dtype), mrla.norm.weight, mrla.norm.bias,
            mrla.norm, lean.drop_path_keep(mrla.drop_path, tail.x), *earlier)
        return out, self._append(head, earlier, value)
