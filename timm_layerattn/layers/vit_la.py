"""Layer attention on a vision transformer's token grid (DeiT + MRLA-light, MRLA-base, KCLA).

A ViT block's output is a token sequence `[B, P + H*W, C]`: `P` prefix tokens (class, distillation, registers)
followed by the patch tokens of an `H x W` grid. The layer-attention maths of the papers acts on `[B, C, H, W]`
maps, so every module here splits the sequence into its prefix and its patch grid (`split_grid`), with the grid
shape given by the caller (the patch embedding's actual grid, never `sqrt(N - 1)`), and joins them back
(`join_grid`).

Every module has the token-unit contract `(x, shortcut, state, grid_h, grid_w) -> (x, state)`: `x` is the block
output, `shortcut` the block input, `state` the carried layer-attention state (a list of tensors whose meaning
belongs to the module). The maths, the official quirks and every decision are in
docs/design/vit_layer_attention.md.
"""
import math
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
import timm.layers

from . import lean, native
from ._checks import check_bool, check_int
from ._common import ChannelConv1d, DepthwiseConv3x3, accumulation_dtype, eca_channel_conv, per_channel

# LayerNorms whose forward is `F.layer_norm` (timm's subclass only picks an implementation of it).
_PLAIN_LAYER_NORMS = (nn.LayerNorm, timm.layers.LayerNorm)

__all__ = ['split_grid', 'join_grid', 'TokenConv', 'TokenCacheSum', 'MRLALightTokens', 'MRLABaseTokens', 'GridCell']


def split_grid(x: torch.Tensor, num_prefix_tokens: int, grid_h: int, grid_w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[B, P + H*W, C]` tokens -> prefix tokens `[B, P, C]` and the patch grid `[B, C, H, W]`, a view in the
    tokens' own (channels_last) layout: the depth-wise conv takes it as it is and its output flattens back to
    tokens without a copy."""
    # one split, not two slices: its backward joins the two gradients, where each slice's would zero a full-size map
    parts = x.split([num_prefix_tokens, x.shape[1] - num_prefix_tokens], dim=1)  # indexed: fx cannot unpack it
    return parts[0], parts[1].reshape(x.shape[0], grid_h, grid_w, x.shape[-1]).permute(0, 3, 1, 2)


def join_grid(prefix: torch.Tensor, grid: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Inverse of `split_grid`: prefix tokens followed by the grid's tokens in row-major order."""
    tokens = grid.flatten(2).transpose(1, 2)
    return torch.cat([prefix, tokens.to(prefix.dtype)], dim=1) if num_prefix_tokens > 0 else tokens


class TokenConv(torch.autograd.Function):
    """The depth-wise 3x3 conv of the patch grid of tokens `y` `[B, P + H*W, C]`, then GELU with `gelu`, as
    `[B, H*W, C]` tokens, on the fused CPU kernels (training; float32).

    Reads and writes the token layout directly (no channels-last views, no copies) and keeps only `y`: backward
    recomputes the conv for GELU's derivative instead of keeping its output.
    """

    @staticmethod
    def forward(ctx, y, weight, num_prefix, grid_h, grid_w, gelu):
        ctx.args = (num_prefix, grid_h, grid_w, gelu)
        ctx.save_for_backward(y, weight)
        return native.token_dwconv(y, weight, num_prefix=num_prefix, grid_h=grid_h, grid_w=grid_w, gelu=gelu)

    @staticmethod
    def reference(y, weight, num_prefix, grid_h, grid_w, gelu):
        """The forward in differentiable PyTorch ops."""
        out = F.conv2d(split_grid(y, num_prefix, grid_h, grid_w)[1], weight, None, 1, 1, 1, weight.shape[0])
        return ((F.gelu(out) if gelu else out).flatten(2).transpose(1, 2),)

    @staticmethod
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        num_prefix, grid_h, grid_w, gelu = ctx.args
        if lean.must_replay():
            g = lean.replay(lambda *t: TokenConv.reference(*t, *ctx.args), [y, weight], [grad],
                            ctx.needs_input_grad[:2])
            return (*g, None, None, None, None)
        g_y, g_w = native.token_dwconv_backward(
            grad.contiguous(), y, weight, num_prefix=num_prefix, grid_h=grid_h, grid_w=grid_w, gelu=gelu)
        return g_y, g_w, None, None, None, None


class TokenCacheSum(torch.autograd.Function):
    """MRLA-base's weighted sum over the cache, `sum_j weights[:, j] * values[j]`, as `[B, H*W, C]` tokens, on the
    fused CPU kernels (training; float32): one pass forward, one backward, instead of a product, a sum and their
    backward per cached value. `values` are `[B, C, H, W]` views of channels-last buffers, as the grid conv makes
    them."""

    @staticmethod
    def forward(ctx, weights, *values):
        ctx.save_for_backward(weights, *values)
        return native.token_cache_sum(weights, [v.permute(0, 2, 3, 1) for v in values])

    @staticmethod
    def reference(weights, *values):
        """The forward in differentiable PyTorch ops."""
        out = values[0] * weights[:, 0, :, None, None]
        for j in range(1, len(values)):
            out = out.addcmul(values[j], weights[:, j, :, None, None])
        return (out.flatten(2).transpose(1, 2),)

    @staticmethod
    def backward(ctx, grad):
        weights, *values = ctx.saved_tensors
        if lean.must_replay():
            return tuple(lean.replay(TokenCacheSum.reference, [weights, *values], [grad], ctx.needs_input_grad))
        g_w, g_v = native.token_cache_sum_backward(
            grad.contiguous(), weights, [v.permute(0, 2, 3, 1) for v in values])
        return (g_w, *[g.permute(0, 3, 1, 2) for g in g_v])


def _training_kernels_usable(*tensors: torch.Tensor) -> bool:
    """Whether the training Functions on tokens (`TokenConv`, `TokenCacheSum`) run: autograd on in eager mode
    (`lean.active()`), no autocast, float32 CPU tensors in contiguous layout with the fused kernels built."""
    if not (lean.active() and native.trainable(*tensors)):  # CPU only: no meta device below
        return False
    return not torch.is_autocast_enabled('cpu')


class _TokenLayerAttn(nn.Module):
    """What MRLA-light and MRLA-base on tokens share: the LayerNorm of the block output (`norm`), the ECA query
    and key of its pooled grid (`q`, `k`), the depth-wise 3x3 value (`v`), the head split and the prefix rule.

    `prefix_norm=True` is the official behaviour: the branch's prefix slots hold the normalised block output, so
    each prefix token `t` becomes `t + LN(t)` (docs/design/vit_layer_attention.md#vit-prefix-quirk); `False`
    leaves prefix tokens to the transformer alone.
    """

    def __init__(
            self,
            channels: int,
            head_dim: int,
            num_prefix_tokens: int,
            prefix_norm: bool,
            norm_layer: Type[nn.Module],
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        owner = type(self).__name__
        check_int(owner, 'channels', channels)
        check_int(owner, 'head_dim', head_dim)
        check_int(owner, 'num_prefix_tokens', num_prefix_tokens, minimum=0)
        check_bool(owner, 'prefix_norm', prefix_norm)
        if channels % head_dim:
            raise ValueError(f'{owner}: channels ({channels}) must be divisible by head_dim ({head_dim})')
        self.channels = channels
        self.head_dim = head_dim
        self.num_heads = channels // head_dim
        self.scale = 1. / math.sqrt(head_dim)
        self.num_prefix_tokens = num_prefix_tokens
        self.prefix_norm = prefix_norm
        self.norm = norm_layer(channels, **dd)
        self.q = ChannelConv1d(channels, **dd)
        self.k = ChannelConv1d(channels, **dd)
        self.v = DepthwiseConv3x3(channels, **dd)

    @torch.jit.unused
    def _fused(self, *tensors: torch.Tensor) -> bool:
        """Whether the fused token kernel computes this block (inference, float32 CPU, eager; the norms plain
        affine LayerNorms, whose eps and parameters it reads)."""
        norms = [m for m in (self.norm, getattr(self, 'norm_prev', None)) if m is not None]
        if not all(type(m) in _PLAIN_LAYER_NORMS and m.weight is not None and m.bias is not None for m in norms):
            return False
        return native.usable(*tensors)

    def _query_key(self, grid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-head query and key `[B, g, d]` of the pooled grid, in the accumulation dtype (float32 under
        float16: their products overflow half precision)."""
        pooled = grid.mean((2, 3))
        qk = eca_channel_conv(pooled, torch.cat([self.q.weight, self.k.weight])).to(accumulation_dtype(pooled))
        return qk[:, 0].view(-1, self.num_heads, self.head_dim), qk[:, 1].view(-1, self.num_heads, self.head_dim)

    def _value(self, y: torch.Tensor, grid: torch.Tensor, grid_h: int, grid_w: int, gelu: bool) -> torch.Tensor:
        """`DW3(grid)` (then GELU with `gelu`) as `[B, H*W, C]` tokens; `grid` is the patch grid of `y`."""
        if not torch.jit.is_scripting():  # a block TorchScript skips
            if _training_kernels_usable(y, self.v.weight) and y.dim() == 3:  # (not traced: no proxy to compare)
                return TokenConv.apply(y, self.v.weight, self.num_prefix_tokens, grid_h, grid_w, gelu)
        value = self.v(grid)
        return (F.gelu(value) if gelu else value).flatten(2).transpose(1, 2)

    def _add(self, x: torch.Tensor, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`x` plus the branch: the patch-token part `tokens` and, with `prefix_norm`, the normalised prefix."""
        p = self.num_prefix_tokens
        if p == 0:
            return x + tokens.to(x.dtype)
        if self.prefix_norm:
            return x + torch.cat([prefix.to(x.dtype), tokens.to(x.dtype)], dim=1)
        return torch.cat([x[:, :p], x[:, p:] + tokens.to(x.dtype)], dim=1)


class MRLALightTokens(_TokenLayerAttn):
    """MRLA-light on the token grid (official `deit/deit_mrla_light.py`):

        y = LN_x(x_t), z = LN_o(o),   Y = grid(y)
        a_h = sigmoid(<Q_h, K_h> / sqrt(d)),   Q, K = ECA(GAP(Y))
        x_t + [y_prefix ; a * GELU(DW3(Y)) + lambda * z_patches]

    `o` is the block input (the paper's previous layer-attention output). No carried state.
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            num_prefix_tokens: int = 1,
            prefix_norm: bool = True,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__(channels, head_dim, num_prefix_tokens, prefix_norm, norm_layer, device=device, dtype=dtype)
        self.norm_prev = norm_layer(channels, device=device, dtype=dtype)
        # Official init: an unscaled N(0, 1) (docs/design/layer_attention.md#la-lambda-init).
        self.lambda_t = nn.Parameter(torch.randn(channels, device=device, dtype=dtype))

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
            grid_h: int,
            grid_w: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not torch.jit.is_scripting():  # a block TorchScript skips (it cannot compile `_fused`'s *tensors)
            if self._fused(x, shortcut):
                return self._forward_fused(x, shortcut, grid_h, grid_w), state
        y = self.norm(x)
        prefix, grid = split_grid(y, self.num_prefix_tokens, grid_h, grid_w)
        q, k = self._query_key(grid)
        gate = per_channel(torch.sigmoid((q * k).sum(-1) * self.scale), self.head_dim).to(grid.dtype)
        value = self._value(y, grid, grid_h, grid_w, gelu=True)  # [B, H*W, C]
        prev = self.norm_prev(shortcut[:, self.num_prefix_tokens:])
        tokens = torch.addcmul(self.lambda_t * prev, value, gate.unsqueeze(1))
        return self._add(x, prefix, tokens), state

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor, shortcut: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        return native.mrla_light_tokens(
            x, shortcut=shortcut, norm_weight=self.norm.weight, norm_bias=self.norm.bias, norm_eps=self.norm.eps,
            prev_weight=self.norm_prev.weight, prev_bias=self.norm_prev.bias, prev_eps=self.norm_prev.eps,
            v_weight=self.v.weight, q_weight=self.q.weight, k_weight=self.k.weight, lambda_t=self.lambda_t,
            num_prefix=self.num_prefix_tokens, grid_h=grid_h, grid_w=grid_w, head_dim=self.head_dim,
            attn_scale=self.scale, prefix_norm=self.prefix_norm)


class MRLABaseTokens(_TokenLayerAttn):
    """MRLA-base on the token grid (official `deit/deit_mrla_base.py`):

        y = LN_x(x_t), Y = grid(y), q, k = ECA(GAP(Y)), v = DW3(Y)
        keys / values: the cache of the blocks since the last reset, plus (k, v)
        x_t + [y_prefix ; sum_j softmax_j(<q_h, k_{j,h}> / sqrt(d)) v_{j,h}]

    State: `[keys [B, T, C], v_0, ..., v_{T-1}]` (values `[B, C, H, W]`, kept as separate tensors). A block with
    `reset=True` starts a new cache (official: every 4th block, docs/design/vit_layer_attention.md#vit-mrlab-reset).
    """

    def __init__(
            self,
            channels: int,
            head_dim: int = 16,
            reset: bool = False,
            num_prefix_tokens: int = 1,
            prefix_norm: bool = True,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__(channels, head_dim, num_prefix_tokens, prefix_norm, norm_layer, device=device, dtype=dtype)
        self.reset = check_bool(type(self).__name__, 'reset', reset)

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
            grid_h: int,
            grid_w: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if not torch.jit.is_scripting():
            fused = self._forward_fused(x, state, grid_h, grid_w)
            if fused is not None:
                return fused
        g, d = self.num_heads, self.head_dim
        y = self.norm(x)
        prefix, grid = split_grid(y, self.num_prefix_tokens, grid_h, grid_w)
        q, k = self._query_key(grid)
        # [B, C, H, W] view of channels-last tokens, the layout the fused inference kernel caches too
        value = self._value(y, grid, grid_h, grid_w, gelu=False).unflatten(1, (grid_h, grid_w)).permute(0, 3, 1, 2)
        if self.reset or len(state) == 0:
            keys = k.reshape(-1, 1, self.channels)
            values = [value]
        else:
            keys = torch.cat([state[0], k.reshape(-1, 1, self.channels)], dim=1)
            values = state[1:] + [value]
        scores = (q.unsqueeze(1) * keys.view(-1, keys.shape[1], g, d)).sum(-1) * self.scale
        weights = per_channel(scores.softmax(dim=1), d).to(value.dtype)  # [B, T, C]
        return self._add(x, prefix, self._cache_sum(weights, values)), [keys] + values

    def _cache_sum(self, weights: torch.Tensor, values: List[torch.Tensor]) -> torch.Tensor:
        """`sum_j weights[:, j] * values[j]` as `[B, H*W, C]` tokens."""
        if not torch.jit.is_scripting():  # a block TorchScript skips
            # checked on `weights` first: under tracing that is False before any permute of the values is built
            if _training_kernels_usable(weights) and _training_kernels_usable(*[v.permute(0, 2, 3, 1) for v in values]):
                return TokenCacheSum.apply(weights, *values)
        out = values[0] * weights[:, 0, :, None, None]
        for j in range(1, len(values)):
            out = out.addcmul(values[j], weights[:, j, :, None, None])
        return out.flatten(2).transpose(1, 2)

    @torch.jit.unused
    def _forward_fused(
            self, x: torch.Tensor, state: List[torch.Tensor], grid_h: int, grid_w: int,
    ) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The fused kernel's step, or None where it does not apply. Cached values are `[B, C, H, W]` views of
        channels-last `[B, H, W, C]` buffers on both paths (the depth-wise conv keeps the token grid's layout); a
        cache in another layout is left to the PyTorch ops, which read any."""
        fresh = self.reset or len(state) == 0
        values = [] if fresh else [v.permute(0, 2, 3, 1) for v in state[1:]]
        if not self._fused(x, *values, *([] if fresh else [state[0]])):
            return None
        out, value, keys = native.mrla_base_tokens(
            x, values=values, keys=None if fresh else state[0], norm_weight=self.norm.weight,
            norm_bias=self.norm.bias, norm_eps=self.norm.eps, v_weight=self.v.weight, q_weight=self.q.weight,
            k_weight=self.k.weight, num_prefix=self.num_prefix_tokens, grid_h=grid_h, grid_w=grid_w,
            head_dim=self.head_dim, attn_scale=self.scale, prefix_norm=self.prefix_norm)
        return out, [keys] + [v.permute(0, 3, 1, 2) for v in values] + [value.permute(0, 3, 1, 2)]


class GridCell(nn.Module):
    """A per-block layer-attention module of the ResNets (`(x, shortcut, state) -> (x, state)` on NCHW maps, e.g.
    `KCLA`) applied to the patch grid of the block output; the prefix tokens pass through unchanged.

    The cell keeps its own dispatch (fused CPU kernels, folded eval norm, fx node); its carried state lives at
    the grid's resolution, which is the same for every block of a ViT.
    """

    def __init__(self, cell: nn.Module, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = check_int(type(self).__name__, 'num_prefix_tokens', num_prefix_tokens, minimum=0)
        self.cell = cell

    def init_weights(self) -> None:
        """The cell's own init (timm's ViT init would give its gate Linear a truncated normal)."""
        self.cell.reset_parameters()

    def forward(
            self,
            x: torch.Tensor,
            shortcut: torch.Tensor,
            state: List[torch.Tensor],
            grid_h: int,
            grid_w: int,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        prefix, grid = split_grid(x, self.num_prefix_tokens, grid_h, grid_w)
        grid = grid.contiguous()  # NCHW: the cell's fused CPU kernels read contiguous maps
        grid, state = self.cell(grid, grid, state)
        return join_grid(prefix, grid, self.num_prefix_tokens), state
