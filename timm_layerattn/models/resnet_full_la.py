"""ResNets with full and linear layer attention: the "Layer Att" baselines of the KCLA paper and MRLA's eq. 4 model.

Papers / code:
* `Enhancing Layer Interaction Using Key-Correlated Layer Attention` (KCLA), Table I baselines - code:
  github.com/bgx666/KCLA (`cifar/models/cifar/layer_attention.py`, `linear_attention.py`)
* `Cross-Layer Retrospective Retrieving via Layer Attention` (MRLA, ICLR 2023), eq. 4 -
  https://arxiv.org/abs/2302.03985, code: github.com/joyfang1106/MRLA (`resnet/models/resnet_la_eq4.py`)

Every block attends over the raw outputs of all earlier blocks of its stage and re-projects them with its own
key and value weights (`layers.full_la`): O(T) cached maps and O(T^2) work per stage of T blocks. The maths and
every decision are in docs/design/full_layer_attention.md.
"""
import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Type

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import full_la as full_la_rules
from ..core.strategy import BlockSite, LayerStrategy, Trunk, TrunkCfg
from ..core.units import Dd
from ..families import Family, ModelArg, cifar_cfg, imagenet_cfg, register_family
from ..layers._checks import check_choice, check_divisor, divisors, fmt_ints
from ..layers.full_la import HEAD_LAYOUTS, FullLACfg, FullLayerAttn, create_full_la
from ._builder import build_model
from .cifar_resnet_la import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['FullLayerAttention']


@dataclass(frozen=True)
class FullLayerAttention(LayerStrategy):
    """Full or linear layer attention (`FullLACfg`) on every block's output; the cache restarts at each stage."""
    attn: FullLACfg

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        check_head_dim(owner, self.attn.head_dim, cfg.block_widths())

    def branch_drop_path(self) -> Optional[float]:
        # Without the attention residual (eq. 4) there is no branch of its own: `drop_path_rate` is then timm's
        # stochastic depth of the trunk residuals (docs/design/full_layer_attention.md#fla-eq4).
        return self.attn.drop_path if self.attn.residual else None

    def init_weights(self, model: Trunk) -> None:
        if self.attn.zero_init_norm:
            for m in model.modules():
                if isinstance(m, FullLayerAttn):
                    nn.init.zeros_(m.norm.weight)

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        return create_full_la(self.attn, site.out_chs, site.block_idx == 0, drop_path, norm_layer=norm_layer, **dd)


def check_head_dim(owner: str, head_dim: Any, widths) -> None:
    check_divisor(owner, 'head_dim', head_dim, divisors(math.gcd(*widths)),
                  f'channels per head: every block width {fmt_ints(widths)} must be divisible into heads')


def _check_head_dim_arg(variant: str, head_dim: Any, arch: ResNetLACfg) -> None:
    check_head_dim(variant, head_dim, arch.block_widths())


def _check_head_layout(variant: str, value: Any, arch: ResNetLACfg) -> None:
    check_choice(variant, 'head_layout', value, HEAD_LAYOUTS)


def _replace_attn(arch: ResNetLACfg, **changes) -> ResNetLACfg:
    return replace(arch, strategy=replace(arch.strategy, attn=replace(arch.strategy.attn, **changes)))


HEAD_DIM = ModelArg('head_dim', check=_check_head_dim_arg, apply=lambda arch, v: _replace_attn(arch, head_dim=v))
# Only the eq. 4 model: 'flat' (default) is the official code's head split, 'per_head' the paper's.
HEAD_LAYOUT = ModelArg(
    'head_layout', check=_check_head_layout, takes=lambda arch: not arch.strategy.attn.residual,
    apply=lambda arch, v: _replace_attn(arch, head_layout=v))


def _cifar(depth: int, kind: str) -> ResNetLACfg:
    n = (depth - 2) // 9
    linear = kind == 'linear_la'
    attn = FullLACfg(kind, head_dim=8 if linear else 16, act=not linear, zero_init_norm=linear)
    return ResNetLACfg(layers=(n, n, n), channels=(16, 32, 64), stem_type='cifar', stem_width=16,
                       strategy=FullLayerAttention(attn), zero_init_last=False)


_EQ4 = FullLayerAttention(FullLACfg('full_la', head_dim=32, residual=False, act=False, head_layout='flat'))

model_cfgs = {
    **{f'cifar_resnet{d}_{s}': _cifar(d, k) for k, s in (('full_la', 'la'), ('linear_la', 'linla'))
       for d in (20, 56, 110)},
    'resnet50_la': ResNetLACfg(layers=(3, 4, 6, 3), strategy=_EQ4),
}


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return cifar_cfg(CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, origin_url='https://github.com/bgx666/KCLA', **kwargs)


default_cfgs = generate_default_cfgs({
    **{f'{name}.untrained': _cifar_cfg() for name in model_cfgs if name.startswith('cifar')},
    'resnet50_la.untrained': imagenet_cfg(
        origin_url='https://github.com/joyfang1106/MRLA', paper_ids='arXiv:2302.03985'),
})

register_family(
    Family('full_la', 'Full layer attention', card='full_la', rules=full_la_rules.RULES['full_la'],
           args=(HEAD_DIM, HEAD_LAYOUT)),
    {n: c for n, c in model_cfgs.items() if c.strategy.attn.type == 'full_la'})
register_family(
    Family('linear_la', 'Linear layer attention', card='full_la', rules=full_la_rules.RULES['linear_la'],
           args=(HEAD_DIM,)),
    {n: c for n, c in model_cfgs.items() if c.strategy.attn.type == 'linear_la'})


@register_model
def cifar_resnet20_la(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with full (softmax) layer attention, head dim 16."""
    return build_model('cifar_resnet20_la', pretrained, **kwargs)


@register_model
def cifar_resnet56_la(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with full (softmax) layer attention, head dim 16."""
    return build_model('cifar_resnet56_la', pretrained, **kwargs)


@register_model
def cifar_resnet110_la(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with full (softmax) layer attention, head dim 16."""
    return build_model('cifar_resnet110_la', pretrained, **kwargs)


@register_model
def cifar_resnet20_linla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with linear layer attention (elu + 1 features, no normaliser), head dim 8."""
    return build_model('cifar_resnet20_linla', pretrained, **kwargs)


@register_model
def cifar_resnet56_linla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with linear layer attention, head dim 8."""
    return build_model('cifar_resnet56_linla', pretrained, **kwargs)


@register_model
def cifar_resnet110_linla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with linear layer attention, head dim 8."""
    return build_model('cifar_resnet110_linla', pretrained, **kwargs)


@register_model
def resnet50_la(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with full layer attention replacing each block's output (MRLA's eq. 4 model), head dim 32."""
    return build_model('resnet50_la', pretrained, **kwargs)
