"""Full and linear layer attention: each block attends over the raw outputs of every earlier block of its stage.

The baselines "Layer Att" of the KCLA paper's Table I (bgx666/KCLA `cifar/models/cifar/layer_attention.py`,
`linear_attention.py`) and the eq. 4 model of the MRLA paper (joyfang1106/MRLA `resnet/models/resnet_la_eq4.py`).
Unlike MRLA-base, which caches each block's key and value as that block projected them, a block here re-projects
the whole cache with its own weights: the cache holds the raw global-average-pooled outputs `p_l` and the raw
maps `x_l` of the stage's blocks `l <= t`, and block `t` computes

    q = Wq(p_t),  k_l = Wk(p_l),  v_l = Wv(x_l)        (ECA-style channel convs; depth-wise 3x3 value)
    softmax:  a_l = softmax_l(<q_h, k_{l,h}> / sqrt(d))   linear:  a_l = <phi(q_h), phi(k_{l,h})>, phi = elu + 1
    o = sum_l a_l v_l                                    (per head h of d channels)

The weights are constant over a head's channels and over space, and `Wv` is depth-wise, so
`sum_l a_l Wv(x_l) == Wv(sum_l a_l x_l)`: one weighted sum and one depth-wise conv per block instead of the
official re-projection of all `t` cached maps (docs/design/full_layer_attention.md#fla-linearity). The MRLA
eq. 4 code splits heads with a flat view of the `[T, C]` cache (`head_layout='flat'`,
#fla-flat-heads); there the sum cannot move before `Wv`, and the cache is stacked and convolved once per block.
"""
import math
from dataclasses import dataclass
from typing import List, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function

from ._checks import check_bool, check_choice, check_int, check_rate
from ._common import ChannelConv1d, DepthwiseConv3x3, accumulation_dtype, depthwise_conv3x3, eca_channel_conv

__all__ = ['FullLACfg', 'FullLayerAttn', 'FlatHeadLayerAttn', 'create_full_la', 'layer_weights', 'FULL_LA_TYPES',
           'HEAD_LAYOUTS']

FULL_LA_TYPES = ('full_la', 'linear_la')
HEAD_LAYOUTS = ('per_head', 'flat')


@dataclass(frozen=True)
class FullLACfg:
    """Full / linear layer attention of a network.

    Attributes:
        type: 'full_la' (softmax over the cached layers) or 'linear_la' (elu + 1 feature map, no normaliser).
        head_dim: Channels per head.
        drop_path: Default drop-path rate of the attention branch (the model's `drop_path_rate` overrides);
            unused without `residual`.
        residual: `x + DropPath(act(BN(o)))` (the KCLA repository's CIFAR code); False: the block output is
            replaced by `BN(o)` (MRLA's eq. 4 model).
        act: ReLU after the BatchNorm.
        head_layout: 'per_head' (head h reads channels h*d..h*d+d-1 of every cached layer) or 'flat' (the eq. 4
            code's `view` of the flattened `[T, C]` cache, docs/design/full_layer_attention.md#fla-flat-heads).
        zero_init_norm: Start the branch BatchNorm's weight at zero (official: one), so that an untrained deep
            net with the unnormalised linear attention does not overflow (docs/design/full_layer_attention.md#fla-init).
    """
    type: str
    head_dim: int
    drop_path: float = 0.
    residual: bool = True
    act: bool = True
    head_layout: str = 'per_head'
    zero_init_norm: bool = False

    def __post_init__(self):
        owner = 'FullLACfg'
        check_choice(owner, 'type', self.type, FULL_LA_TYPES)
        check_int(owner, 'head_dim', self.head_dim)
        check_rate(owner, 'drop_path', self.drop_path)
        check_bool(owner, 'residual', self.residual)
        check_bool(owner, 'act', self.act)
        check_choice(owner, 'head_layout', self.head_layout, HEAD_LAYOUTS)
        check_bool(owner, 'zero_init_norm', self.zero_init_norm)


@torch.fx.wrap  # one graph node that dispatches as in eager (fused channel convs): fx reproduces eager bit for bit
@register_notrace_function
def layer_weights(
        pooled: torch.Tensor,
        gaps: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        head_dim: int,
        linear: bool,
        flat: bool,
) -> torch.Tensor:
    """Attention weights `[B, T, G]` of a block over its stage's cache: entry `[b, l, h]` multiplies the
    channels `h*d..h*d+d-1` of cached map `l`.

    Args:
        pooled: The block output's global average `[B, C]` (the query's input).
        gaps: The cached global averages `[B, T, C]`, this block's last.
        q_weight, k_weight: The ECA channel-conv weights `[1, 1, k]`.
        head_dim: `d`; `G = C // d` heads.
        linear: `<elu(q) + 1, elu(k) + 1>` per head, unnormalised; else `softmax_l(<q, k_l> / sqrt(d))`.
        flat: Heads as the eq. 4 code splits them: `[T, C]` flattened and viewed as `[G, T, d]`.

    Computed in `accumulation_dtype` (float32 under float16 / bfloat16).
    """
    b, t, c = gaps.shape
    g = c // head_dim
    acc = accumulation_dtype(pooled)
    q = eca_channel_conv(pooled, q_weight)[:, 0].to(acc)
    k = eca_channel_conv(gaps.reshape(b * t, c), k_weight)[:, 0].to(acc).reshape(b, t, c)
    if linear:
        q, k = F.elu(q) + 1., F.elu(k) + 1.
    k = k.reshape(b, g, t, head_dim) if flat else k.view(b, t, g, head_dim).transpose(1, 2)
    scores = (q.view(b, g, 1, head_dim) * k).sum(-1)  # [B, G, T]
    if not linear:
        scores = (scores * (1. / math.sqrt(head_dim))).softmax(-1)
    # flat: virtual head g, step s is chunk n = g * T + s of the flattened cache, i.e. layer n // G, head n % G
    return scores.reshape(b, t, g) if flat else scores.transpose(1, 2)


class FullLayerAttn(nn.Module):
    """One block's full (softmax) or linear layer attention over its stage's cache of raw block outputs.

    `forward(x, shortcut, state) -> (out, state)` with `state = [gaps [B, T, C], x_0, ..., x_{T-1}]`: the raw
    pooled outputs and raw maps of the stage's earlier blocks; this block appends its own. The first block of a
    stage starts a new cache. Cached maps are never modified (outputs are new tensors).
    """
    FLAT_HEADS = False

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            linear: bool = False,
            first_in_stage: bool = False,
            residual: bool = True,
            act: bool = True,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        owner = type(self).__name__
        check_int(owner, 'channels', channels)
        check_int(owner, 'head_dim', head_dim)
        check_rate(owner, 'drop_path', drop_path)
        for name, value in (('linear', linear), ('first_in_stage', first_in_stage), ('residual', residual),
                            ('act', act)):
            check_bool(owner, name, value)
        if channels % head_dim:
            raise ValueError(f'{owner}: channels ({channels}) must be divisible by head_dim ({head_dim})')
        self.channels = channels
        self.head_dim = head_dim
        self.linear = linear
        self.first_in_stage = first_in_stage
        self.residual = residual
        self.act = act
        self.flat_heads = self.FLAT_HEADS
        self.query = ChannelConv1d(channels, **dd)
        self.key = ChannelConv1d(channels, **dd)
        self.value = DepthwiseConv3x3(channels, **dd)
        self.norm = norm_layer(channels, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def extra_repr(self) -> str:
        return (f'{self.channels}, head_dim={self.head_dim}, linear={self.linear}, '
                f'first_in_stage={self.first_in_stage}, residual={self.residual}, act={self.act}')

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        pooled = x.mean((2, 3))
        if self.first_in_stage or len(state) == 0:
            gaps = pooled.unsqueeze(1)
            maps = [x]
        else:
            gaps = torch.cat([state[0], pooled.unsqueeze(1)], dim=1)
            maps = state[1:] + [x]
        weights = layer_weights(
            pooled, gaps, self.query.weight, self.key.weight, self.head_dim, self.linear, self.flat_heads).to(x.dtype)
        return self._attend(maps, weights), [gaps] + maps

    def _attend(self, maps: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """`x + DropPath(act(BN(Wv(sum_l a_l x_l))))` (or without `x +`): the weighted sum of the raw maps, then
        the one depth-wise conv (#fla-linearity)."""
        w = weights.repeat_interleave(self.head_dim, dim=-1)[:, :, :, None, None]  # [B, T, C, 1, 1]
        s = maps[0] * w[:, 0]
        for l in range(1, len(maps)):
            s = s.addcmul_(maps[l], w[:, l])  # `s` is this block's own buffer: in place under autograd too
        return self._tail(maps[-1], self.norm(self.value(s)))

    def _tail(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """`x + DropPath(act(o))` or `act(o)`; without autograd in place on `o` (never on the cached `x`)."""
        if torch.is_grad_enabled():
            if self.act:
                o = torch.relu(o)
            return x + self.drop_path(o) if self.residual else o
        if self.act:
            o = o.relu_()
        return self.drop_path(o).add_(x) if self.residual else o


class FlatHeadLayerAttn(FullLayerAttn):
    """`FullLayerAttn` with the heads of MRLA's eq. 4 code (docs/design/full_layer_attention.md#fla-flat-heads):
    the `[T, C]` cache flattened and viewed as `[G, T, d]`, so virtual head `g` reads the `d`-channel chunks
    `g*T .. g*T+T-1` of the flattened cache, from consecutive heads and layers."""
    FLAT_HEADS = True

    def _attend(self, maps: List[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """The eq. 4 code's head split: `Wv` on every cached map (stacked once), then per virtual head the
        weighted sum of its `T` consecutive `d`-channel chunks of the flattened cache (one batched matmul)."""
        x = maps[-1]
        b, c, h, w = x.shape
        t = len(maps)
        g = c // self.head_dim
        stacked = torch.stack(maps, dim=1).reshape(b * t, c, h, w)
        values = depthwise_conv3x3(stacked, self.value.weight).reshape(b * g, t, self.head_dim * h * w)
        o = torch.bmm(weights.reshape(b * g, 1, t), values).reshape(b, c, h, w)
        return self._tail(x, self.norm(o))


def create_full_la(cfg: FullLACfg, channels: int, first_in_stage: bool, drop_path: float,
                   norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None) -> FullLayerAttn:
    """The module of one block for the network's `FullLACfg`."""
    cls = FlatHeadLayerAttn if cfg.head_layout == 'flat' else FullLayerAttn
    return cls(channels, head_dim=cfg.head_dim, linear=cfg.type == 'linear_la', first_in_stage=first_in_stage,
               residual=cfg.residual, act=cfg.act, drop_path=drop_path if cfg.residual else 0.,
               norm_layer=norm_layer, device=device, dtype=dtype)
