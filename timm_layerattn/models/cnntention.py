"""CNNtention: He et al.'s CIFAR ResNet-20 with self-attention, multi-head attention or CBAM after each stage.

Paper: `CNNtention: Can CNNs do better with Attention?` (N. Kapila, J. Glattki, T. Rathi, arXiv:2412.11657).
Official code: github.com/AttentionSeekers/CNNtention (no licence file: nothing of it is copied or shipped
here; docs/design/cnntention.md#cnn-modules describes the maths, verified against the authors' checkpoints).

Backbone: 3x3 stem of width 16, three stages of three BasicBlocks (16/32/64 channels at 32/16/8 px),
option-A (parameter-free) shortcuts, global average pooling: 269,722 parameters for 10 classes. One
attention module runs after each stage (`layerS.attn`) and its output replaces the stage output; each
module carries its own residual (gamma-gated for SelfAtt / MHA, plain for CBAM). Attention modules are
stage exit units of the `ResNetLA` skeleton, so they follow its `(x, state) -> (x, state)` contract.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import cnntention as official_rules
from ..core.strategy import LayerStrategy, StageSite, TrunkCfg
from ..core.units import Dd, Shared, State
from ..families import Family, ModelArg, cifar_cfg, register_family
from ..layers._checks import check_divisor, check_int, divisors, fmt_ints
from ._builder import build_model
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['SelfAttention2d', 'MultiHeadAttention2d', 'CBAM', 'StageAttention', 'checkpoint_filter_fn',
           'CNNTENTION_MEAN', 'CNNTENTION_STD']

# The authors' normalisation (grey statistics, docs/design/cnntention.md#cnn-recipe):
# right for their checkpoints, fine for new training.
CNNTENTION_MEAN = (0.4919, 0.4919, 0.4919)
CNNTENTION_STD = (0.2470, 0.2470, 0.2470)


def _kaiming_linear(m: nn.Linear) -> None:
    # The official init loop covers every Linear too (docs/design/cnntention.md#cnn-init); conv weights are set
    # by the model's init.
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

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        B, C, H, W = x.shape
        q = self.q(x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, N, C]
        k = self.k(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.v(x).flatten(2).transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.)  # the official module does not scale
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return self.gamma * out + x, state


class MultiHeadAttention2d(nn.Module):
    """Spatial multi-head attention with an output projection and a zero-initialised residual gate
    (official `MultiHeadAtt`; its conv named `key` supplies the queries and `query` the keys,
    docs/design/cnntention.md#cnn-mha-role-swap)."""

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

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
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

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
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


@dataclass(frozen=True)
class StageAttention(LayerStrategy):
    """One attention module after each stage ('selfatt', 'mha' or 'cbam'); its output replaces the stage's."""
    kind: str
    att_heads: int = 8
    cbam_reduction: int = 16
    cbam_kernel: int = 7

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        if self.kind == 'mha':
            widths = cfg.block_widths()
            check_divisor(owner, 'att_heads', self.att_heads, divisors(math.gcd(*widths)),
                          f'attention heads: every stage width {fmt_ints(widths)} must be divisible into heads')
        if self.kind == 'cbam':
            _check_cbam(owner, self.cbam_reduction, self.cbam_kernel, ('cbam_reduction', 'cbam_kernel'))

    def stage_exit(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        if self.kind == 'selfatt':
            return SelfAttention2d(site.out_chs, **dd)
        if self.kind == 'mha':
            return MultiHeadAttention2d(site.out_chs, self.att_heads, **dd)
        return CBAM(site.out_chs, self.cbam_reduction, self.cbam_kernel, **dd)


def _cnntention_arch(kind: str = '') -> ResNetLACfg:
    return ResNetLACfg(
        layers=(3, 3, 3), channels=(16, 32, 64), block='basic', stem_type='cifar', stem_width=16,
        residual='pad', zero_init_last=False, strategy=StageAttention(kind) if kind else None)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: ResNetLA) -> Dict[str, torch.Tensor]:
    """Map the authors' checkpoints (`att{i}.*` -> `layer{i}.attn.*`, incl. MHA's swapped key / query) to
    this layout. A checkpoint already in this layout passes through unchanged."""
    return official_rules.RULES.filter(state_dict, model)


_KINDS = {f'cifar_resnet20_basic{"_" + kind if kind else ""}': kind for kind in ('', 'selfatt', 'mha', 'cbam')}
model_cfgs = {name: _cnntention_arch(kind) for name, kind in _KINDS.items()}


def _kind_is(kind: str) -> Callable[[ResNetLACfg], bool]:
    return lambda arch: isinstance(arch.strategy, StageAttention) and arch.strategy.kind == kind


# Model kwargs beyond timm's, each taken by one variant kind; `StageAttention.check` checks the values.
CNNTENTION_ARGS = (
    ModelArg('att_heads', 'strategy.att_heads', takes=_kind_is('mha')),
    ModelArg('cbam_reduction', 'strategy.cbam_reduction', takes=_kind_is('cbam')),
    ModelArg('cbam_kernel', 'strategy.cbam_kernel', takes=_kind_is('cbam')),
)


def _cfg(**kwargs) -> Dict[str, Any]:
    return cifar_cfg(CNNTENTION_MEAN, CNNTENTION_STD, paper_ids='arXiv:2412.11657',
                     origin_url='https://github.com/AttentionSeekers/CNNtention', **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})

register_family(Family(
    'cnntention', 'CNNtention', card='cnntention', rules=official_rules.RULES, args=CNNTENTION_ARGS), model_cfgs)


@register_model
def cifar_resnet20_basic(pretrained: bool = False, **kwargs) -> ResNetLA:
    """He et al.'s CIFAR ResNet-20 (BasicBlocks, option-A shortcuts, 0.27M): CNNtention's baseline."""
    return build_model('cifar_resnet20_basic', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_selfatt(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with gamma-gated full-width self-attention after each stage (CNNtention)."""
    return build_model('cifar_resnet20_basic_selfatt', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_mha(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with gamma-gated 8-head attention after each stage (CNNtention)."""
    return build_model('cifar_resnet20_basic_mha', pretrained, **kwargs)


@register_model
def cifar_resnet20_basic_cbam(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-20 (BasicBlock) with CBAM (reduction 16) after each stage (CNNtention)."""
    return build_model('cifar_resnet20_basic_cbam', pretrained, **kwargs)
