"""CNNtention: He et al.'s CIFAR ResNet-20 with self-attention, multi-head attention or CBAM after each stage.

Paper: `CNNtention: Can CNNs do better with Attention?` (N. Kapila, J. Glattki, T. Rathi, arXiv:2412.11657).
Official code: github.com/AttentionSeekers/CNNtention (no licence file: nothing of it is copied or shipped
here; the spec cnntention.md describes the maths, verified against the authors' checkpoints).

Backbone: 3x3 stem of width 16, three stages of three BasicBlocks (16/32/64 channels at 32/16/8 px),
option-A (parameter-free) shortcuts, global average pooling: 269,722 parameters for 10 classes. One
attention module runs after each stage (`layerS.attn`) and its output replaces the stage output; each
module carries its own residual (gamma-gated for SelfAtt / MHA, plain for CBAM). Attention modules are
stage exit units of the `ResNetLA` skeleton, so they follow its `(x, state) -> (x, state)` contract.
"""
import math
from dataclasses import replace
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..layers._checks import check_divisor, check_int, divisors, fmt_ints
from ._builder import build_la_model
from .resnet_la import ResNetLA, ResNetLACfg
from .resnet_la import checkpoint_filter_fn as _la_checkpoint_filter_fn

__all__ = ['SelfAttention2d', 'MultiHeadAttention2d', 'CBAM', 'checkpoint_filter_fn', 'CNNTENTION_MEAN',
           'CNNTENTION_STD']

State = List[torch.Tensor]

# The authors' normalisation (grey statistics, spec §5): right for their checkpoints, fine for new training.
CNNTENTION_MEAN = (0.4919, 0.4919, 0.4919)
CNNTENTION_STD = (0.2470, 0.2470, 0.2470)


def _kaiming_linear(m: nn.Linear) -> None:
    # The official init loop covers every Linear too (spec §3.4); conv weights are set by the model's init.
    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')


class SelfAttention2d(nn.Module):
    """Full-width spatial self-attention with a zero-initialised residual gate (official `SelfAtt`).

    `y = gamma * (softmax_keys(q k^T) v) + x` over the H*W positions, q/k/v 1x1 convs with bias, no scaling.
    """

    def __init__(self, channels: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.q = nn.Conv2d(channels, channels, 1, **dd)
        self.k = nn.Conv2d(channels, channels, 1, **dd)
        self.v = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        B, C, H, W = x.shape
        q = self.q(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, C]
        k = self.k(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.v(x).flatten(2).transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.)  # the official module does not scale
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return self.gamma * out + x, state


class MultiHeadAttention2d(nn.Module):
    """Spatial multi-head attention with an output projection and a zero-initialised residual gate
    (official `MultiHeadAtt`; its conv named `key` supplies the queries and `query` the keys, spec §3.2)."""

    def __init__(self, channels: int, num_heads: int = 8, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        check_int('MultiHeadAttention2d', 'num_heads', num_heads)
        if channels % num_heads:
            raise ValueError(f'MultiHeadAttention2d: {channels} channels are not divisible into {num_heads} heads')
        self.num_heads = num_heads
        self.q = nn.Conv2d(channels, channels, 1, **dd)
        self.k = nn.Conv2d(channels, channels, 1, **dd)
        self.v = nn.Conv2d(channels, channels, 1, **dd)
        self.proj = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        B, C, H, W = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, h, C // h, H * W).transpose(2, 3)  # [B, h, N, d]
        k = self.k(x).reshape(B, h, C // h, H * W).transpose(2, 3)
        v = self.v(x).reshape(B, h, C // h, H * W).transpose(2, 3)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(2, 3).reshape(B, C, H, W))
        return self.gamma * out + x, state


class _ChannelMlp(nn.Module):
    def __init__(self, channels: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, channels, bias=False, device=device, dtype=dtype)
        _kaiming_linear(self.fc1)
        _kaiming_linear(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CBAM(nn.Module):
    """Channel then spatial attention (CBAM) with a residual add (official `CBAM`, reduction 16).

    Spatial descriptor order is [max, mean] (the CBAM paper uses [mean, max]); the spatial conv has a bias.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        _check_cbam('CBAM', reduction, kernel_size)
        self.channel_mlp = _ChannelMlp(channels, max(channels // reduction, 1), **dd)
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, **dd)

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        gate = self.channel_mlp(x.amax((2, 3))) + self.channel_mlp(x.mean((2, 3)))
        f = x * torch.sigmoid(gate)[:, :, None, None]
        s = torch.cat([f.amax(1, keepdim=True), f.mean(1, keepdim=True)], dim=1)
        f = f * torch.sigmoid(self.spatial_conv(s))
        return f + x, state


def _check_cbam(owner: str, reduction: Any, kernel_size: Any, names: Tuple[str, str] = ('reduction', 'kernel_size')):
    check_int(owner, names[0], reduction)
    # An even kernel would pad unevenly and change the map's size.
    allowed = 'a positive odd integer'
    check_int(owner, names[1], kernel_size, allowed=allowed)
    if kernel_size % 2 == 0:
        raise ValueError(f'{owner}: {names[1]} must be {allowed}, got {kernel_size!r}')


def _stage_attn(
        kind: str,
        stage_idx: int,
        channels: int,
        att_heads: int = 8,
        cbam_reduction: int = 16,
        cbam_kernel: int = 7,
        device=None,
        dtype=None,
) -> nn.Module:
    dd = {'device': device, 'dtype': dtype}
    if kind == 'selfatt':
        return SelfAttention2d(channels, **dd)
    if kind == 'mha':
        return MultiHeadAttention2d(channels, att_heads, **dd)
    return CBAM(channels, cbam_reduction, cbam_kernel, **dd)


def _cnntention_arch(kind: str = '') -> ResNetLACfg:
    return ResNetLACfg(
        layers=(3, 3, 3), channels=(16, 32, 64), block='basic', stem_type='cifar', stem_width=16,
        residual='pad', zero_init_last=False, stage_post=partial(_stage_attn, kind) if kind else None)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ResNetLA) -> Dict[str, torch.Tensor]:
    """Map the authors' checkpoints (`att{i}.*` -> `layer{i}.attn.*`, spec §6, incl. MHA's swapped key/query)
    to this layout. A checkpoint already in this layout passes through unchanged."""
    from ..convert import _cnntention_variant_from_keys, remap_cnntention_keys
    state_dict = _la_checkpoint_filter_fn(state_dict, model)
    variant = _cnntention_variant_from_keys(state_dict)
    if variant is None:
        return state_dict
    return {k: v.reshape(1) if k.endswith('.attn.gamma') else v
            for k, v in remap_cnntention_keys(state_dict, variant).items()}


_KINDS = {f'cifar_resnet20_basic{"_" + kind if kind else ""}': kind for kind in ('', 'selfatt', 'mha', 'cbam')}
model_cfgs = {name: _cnntention_arch(kind) for name, kind in _KINDS.items()}


def _create_cnntention(
        variant: str,
        pretrained: bool = False,
        att_heads: Optional[int] = None,
        cbam_reduction: Optional[int] = None,
        cbam_kernel: Optional[int] = None,
        **kwargs,
) -> ResNetLA:
    cfg, kind = replace(model_cfgs[variant], name=variant), _KINDS[variant]
    given = dict(att_heads=att_heads, cbam_reduction=cbam_reduction, cbam_kernel=cbam_kernel)
    takes = dict(att_heads='mha', cbam_reduction='cbam', cbam_kernel='cbam')
    for name, value in given.items():
        if value is not None and takes[name] != kind:
            raise TypeError(f'{variant} does not take {name!r}')
    if att_heads is not None:
        widths = cfg.block_widths()[0]
        check_divisor(variant, 'att_heads', att_heads, divisors(math.gcd(*widths)),
                      f'attention heads: every stage width {fmt_ints(widths)} must be divisible into heads')
    if kind == 'cbam':
        _check_cbam(variant, 16 if cbam_reduction is None else cbam_reduction,
                    7 if cbam_kernel is None else cbam_kernel, ('cbam_reduction', 'cbam_kernel'))
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        cfg = replace(cfg, stage_post=partial(_stage_attn, kind, **given))
    return build_la_model(
        ResNetLA, variant, pretrained, cfg, checkpoint_filter_fn, default_out_indices=(0, 1, 2, 3), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8), 'min_input_size': (3, 8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CNNTENTION_MEAN, 'std': CNNTENTION_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2412.11657',
        'origin_url': 'https://github.com/AttentionSeekers/CNNtention',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})


@register_model
def cifar_resnet20_basic(pretrained: bool = False, **kwargs) -> ResNetLA:
    """He et al.'s CIFAR ResNet-20 (BasicBlocks, option-A shortcuts, 0.27M): CNNtention's baseline."""
    return _create_cnntention('cifar_resnet20_basic', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_selfatt(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with gamma-gated full-width self-attention after each stage (CNNtention)."""
    return _create_cnntention('cifar_resnet20_basic_selfatt', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_mha(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with gamma-gated 8-head attention after each stage (CNNtention)."""
    return _create_cnntention('cifar_resnet20_basic_mha', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_cbam(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with CBAM (reduction 16) after each stage (CNNtention)."""
    return _create_cnntention('cifar_resnet20_basic_cbam', pretrained, **kwargs)
