"""GradAttn: a residual-free ResNet-18 whose multi-scale features a small transformer encoder combines.

Paper: `GradAttn: Replacing Fixed Residual Connections with Task-Modulated Attention Pathways`
(S. Ghoshal, arXiv:2603.26756; Applied Sciences 2026, 16(11), 5252). Official code (MIT, © 2025 Soudeep
Ghoshal): github.com/SoudeepGhoshal/GradAttn. Design notes: docs/design/gradattn.md#ga-architecture.

Every shortcut of ResNet-18 is removed (`PlainBlock`: conv-BN-ReLU-conv-BN-ReLU). One token per depth is
made from the globally pooled post-max-pool stem output and the four stage outputs (a Linear per level),
the 5 tokens go through a 3-layer post-norm transformer encoder (d 256, 8 heads, FFN 512, dropout 0.1),
and the classifier reads their mean. Variants: no positional information (`nope`), a learned positional
embedding (`lpe`) or rotary embeddings over the depth index (`rope`).

On the `ResNetLA` skeleton the token encoder is the *neck*: `forward_features` returns the encoded tokens as
an NCHW map `[B, 256, 1, 5]`, so timm's standard head (global average pool = mean over tokens, then `fc`)
is the paper's classifier. `features_only` gives the five taps (64/64/128/256/512 channels at reductions
4/4/8/16/32) and prunes the neck.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import gradattn as official_rules
from ..core.strategy import LayerStrategy, TrunkCfg
from ..core.units import Dd
from ..families import Family, ModelArg, imagenet_cfg, register_family
from ..layers import native
from ..layers._checks import check_choice, check_int, check_rate
from ._builder import build_model
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['GradAttnNeck', 'TokenEncoder', 'TokenEncoderLayer', 'rotary_cos_sin', 'checkpoint_filter_fn']


def rotary_cos_sin(
        num_pos: int,
        dim: int,
        base: float = 10000.,
        device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`cos`, `sin` `[num_pos, dim]` of rotary embeddings at positions 0..num_pos-1 (rotate-half pairing:
    frequencies `base^(-2i/dim)` repeated as [f, f]), in float32 as the official module computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(torch.arange(num_pos, device=device).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _check_encoder(
        owner: str,
        embed_dim: Any,
        num_heads: Any,
        mlp_dim: Any,
        drop: Any,
        rope: bool,
        names: Tuple[str, str] = ('embed_dim', 'drop'),
) -> None:
    """The token encoder's sizes: whole heads (of even size for RoPE, which rotates pairs of channels)."""
    dim_name, drop_name = names
    check_int(owner, 'num_heads', num_heads)
    step = 2 * num_heads if rope else num_heads
    allowed = f'a positive multiple of {"2 * num_heads" if rope else "num_heads"} ({step})'
    check_int(owner, dim_name, embed_dim, allowed=allowed)
    if embed_dim % step:
        raise ValueError(f'{owner}: {dim_name} must be {allowed}, got {embed_dim!r}')
    check_int(owner, 'mlp_dim', mlp_dim)
    check_rate(owner, drop_name, drop)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class TokenEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (the `torch.nn.TransformerEncoderLayer` maths, ReLU FFN).

    `rope=True` rotates queries and keys per head by their token index (the official RoPE layer, whose
    q/k/v projections have no bias). Attention runs through `F.scaled_dot_product_attention`.
    """

    def __init__(
            self,
            dim: int = 256,
            num_heads: int = 8,
            mlp_dim: int = 512,
            drop: float = 0.1,
            rope: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_encoder('TokenEncoderLayer', dim, num_heads, mlp_dim, drop, rope, ('dim', 'drop'))
        self.num_heads = num_heads
        self.rope = rope
        self.drop = drop
        self.qkv = nn.Linear(dim, dim * 3, bias=not rope, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.fc1 = nn.Linear(dim, mlp_dim, **dd)
        self.fc2 = nn.Linear(mlp_dim, dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)
        if not rope:
            # torch.nn.MultiheadAttention's init (the official No-PE / LPE layers are the torch layer)
            nn.init.xavier_uniform_(self.qkv.weight)
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.num_heads
        drop = self.drop if self.training else 0.
        q, k, v = self.qkv(x).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, T, d]
        if self.rope:
            cos, sin = rotary_cos_sin(T, D // h, device=x.device)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        a = _attention(q, k, v, drop)
        a = self.proj(a.transpose(1, 2).reshape(B, T, D))
        x = self.norm1(x + F.dropout(a, drop, self.training))
        y = self.fc2(F.dropout(F.relu(self.fc1(x)), drop, self.training))
        return self.norm2(x + F.dropout(y, drop, self.training))


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, drop: float) -> torch.Tensor:
    """Scaled dot-product attention. PyTorch's fused CPU kernel has no forward derivative and no batching rule
    for its backward, so under `torch.func` transforms and forward-mode AD the same maths runs as plain ops."""
    if not torch.jit.is_scripting() and _transforms_active():
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return F.dropout(scores.softmax(-1), drop, drop > 0.) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)


@torch.jit.unused
def _transforms_active() -> bool:
    return native.transforms_active()


class GradAttnNeck(nn.Module):
    """Tokens from every feature level (global average pool + Linear), encoded over the depth axis.

    Returns the encoded tokens as an NCHW map `[B, embed_dim, 1, num_levels]`.
    """

    def __init__(
            self,
            in_chs: Sequence[int],
            embed_dim: int = 256,
            depth: int = 3,
            num_heads: int = 8,
            mlp_dim: int = 512,
            drop: float = 0.1,
            pos: str = 'none',
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_choice('GradAttnNeck', 'pos', pos, ('none', 'learned', 'rope'))
        _check_encoder('GradAttnNeck', embed_dim, num_heads, mlp_dim, drop, pos == 'rope')
        check_int('GradAttnNeck', 'depth', depth, minimum=0)
        self.num_features = embed_dim
        self.proj = nn.ModuleList([nn.Linear(c, embed_dim, **dd) for c in in_chs])
        self.pos_embed = nn.Parameter(torch.randn(1, len(in_chs), embed_dim, **dd)) if pos == 'learned' else None
        self.layers = nn.ModuleList([
            TokenEncoderLayer(embed_dim, num_heads, mlp_dim, drop, rope=pos == 'rope', **dd) for _ in range(depth)])

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        tokens = [proj(feats[i].mean((2, 3))) for i, proj in enumerate(self.proj)]
        x = torch.stack(tokens, dim=1)  # [B, T, D], in depth order
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2).unsqueeze(2)


@dataclass(frozen=True)
class TokenEncoder(LayerStrategy):
    """GradAttn's neck: one token per feature level, encoded over the depth axis (see `GradAttnNeck`)."""
    pos: str = 'none'
    embed_dim: int = 256
    depth: int = 3
    num_heads: int = 8
    mlp_dim: int = 512
    drop: float = 0.1

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        # Named as the model kwargs that set them (`GRADATTN_ARGS`).
        _check_encoder(owner, self.embed_dim, self.num_heads, self.mlp_dim, self.drop, self.pos == 'rope',
                       ('embed_dim', 'encoder_drop_rate'))
        check_int(owner, 'depth', self.depth, minimum=0, allowed='a non-negative integer (encoder layers)')

    def neck(self, feature_chs: List[int], dd: Dd) -> Optional[nn.Module]:
        return GradAttnNeck(feature_chs, self.embed_dim, self.depth, self.num_heads, self.mlp_dim, self.drop,
                            self.pos, **dd)


def _gradattn_arch(pos: str) -> ResNetLACfg:
    return ResNetLACfg(
        layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), block='basic', residual='none', stem_feat='pool',
        zero_init_last=False, strategy=TokenEncoder(pos))


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ResNetLA) -> Dict[str, torch.Tensor]:
    """Map a notebook-trained GradAttn state dict to this layout (RoPE: `w_q/w_k/w_v` concatenated into
    `qkv`). A checkpoint already in this layout passes through unchanged."""
    return official_rules.RULES.filter(state_dict, model)


_POS = {'resnet18_gradattn_nope': 'none', 'resnet18_gradattn_lpe': 'learned', 'resnet18_gradattn_rope': 'rope'}
model_cfgs = {name: _gradattn_arch(pos) for name, pos in _POS.items()}


# The token encoder's sizes as model kwargs; `TokenEncoder.check` checks them together.
GRADATTN_ARGS = (
    ModelArg('embed_dim', 'strategy.embed_dim'),
    ModelArg('num_heads', 'strategy.num_heads'),
    ModelArg('mlp_dim', 'strategy.mlp_dim'),
    ModelArg('depth', 'strategy.depth'),
    ModelArg('encoder_drop_rate', 'strategy.drop'),  # attention, residual and FFN dropout
)


def _cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(pool_size=(1, 5), min_input_size=(3, 28, 28), paper_ids='arXiv:2603.26756',
                        origin_url='https://github.com/SoudeepGhoshal/GradAttn', **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})

register_family(Family('gradattn', 'GradAttn', card='gradattn', rules=official_rules.RULES, args=GRADATTN_ARGS),
                model_cfgs)


@register_model
def resnet18_gradattn_nope(pretrained: bool = False, **kwargs) -> ResNetLA:
    """GradAttn-18 without positional information (residual-free ResNet-18 + 3-layer token encoder)."""
    return build_model('resnet18_gradattn_nope', pretrained, **kwargs)


@register_model
def resnet18_gradattn_lpe(pretrained: bool = False, **kwargs) -> ResNetLA:
    """GradAttn-18 with a learned positional embedding of the 5 depth tokens."""
    return build_model('resnet18_gradattn_lpe', pretrained, **kwargs)


@register_model
def resnet18_gradattn_rope(pretrained: bool = False, **kwargs) -> ResNetLA:
    """GradAttn-18 with rotary embeddings over the depth index (bias-free q/k/v)."""
    return build_model('resnet18_gradattn_rope', pretrained, **kwargs)
