"""ResNets with Dynamic Layer Attention (DLA-light, DLA-base): CIFAR bottleneck nets and ImageNet ResNet-50 / 101.

Paper: `Strengthening Layer Interaction via Dynamic Layer Attention` (IJCAI 2024) - https://arxiv.org/abs/2406.13392,
code: github.com/tunantu/Dynamic-Layer-Attention (ImageNet DLA-light, CIFAR), github.com/bgx666/KCLA (the CIFAR
copies behind the KCLA paper's Table I).

The strategy (`DynamicLayerAttention`) puts one dynamic sharing unit in front of each stage (`layerS.attn_in`)
and MRLA-light / MRLA-base with the unit's gating on every block (`layerS.i.attn`). Model names say `dynlal` /
`dynlab` (no name may contain the substring 'dla'). The maths and every decision:
docs/design/dynamic_layer_attention.md.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import dynamic_la
from ..core.strategy import BlockSite, LayerStrategy, StageSite, TrunkCfg
from ..core.units import Dd
from ..families import Family, ModelArg, cifar_cfg, imagenet_cfg, register_family
from ..layers._checks import check_bool, check_choice, check_divisor, check_int, check_rate, divisors, fmt_ints
from ..layers.dynamic_la import DynamicLABase, DynamicLALight, DynamicSharingUnit
from ._builder import build_model
from .cifar_resnet_la import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['DynamicLayerAttention']


@dataclass(frozen=True)
class DynamicLayerAttention(LayerStrategy):
    """A dynamic sharing unit per stage and DLA-light / DLA-base on every block.

    Attributes:
        form: 'light' (MRLA-light with the DSU-refreshed shortcut) or 'base' (MRLA-base over a DSU-re-weighted
            cache).
        head_dim: Channels per attention head.
        dsu_reduction: Hidden width of the DSU's maps is `C // dsu_reduction` (official: 4 CIFAR, 16 ImageNet).
        batch_coupled_gate: Reproduce the official gate step, which reads the first sample's DSU state for
            every sample of the batch (outputs then depend on the batch); default: each sample's own.
        drop_path: Default drop-path rate of the attention branch (the model's `drop_path_rate` overrides).
    """
    form: str
    head_dim: int
    dsu_reduction: int
    batch_coupled_gate: bool = False
    drop_path: float = 0.

    def __post_init__(self):
        owner = type(self).__name__
        check_choice(owner, 'form', self.form, ('light', 'base'))
        check_int(owner, 'head_dim', self.head_dim)
        check_int(owner, 'dsu_reduction', self.dsu_reduction)
        check_bool(owner, 'batch_coupled_gate', self.batch_coupled_gate)
        check_rate(owner, 'drop_path', self.drop_path)

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        widths = cfg.block_widths()
        check_head_dim(owner, self.head_dim, widths)
        check_dsu_reduction(owner, self.dsu_reduction, widths)

    def branch_drop_path(self) -> Optional[float]:
        return self.drop_path

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        return DynamicSharingUnit(site.out_chs, self.dsu_reduction, excite=self.form == 'light', **dd)

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        cls = DynamicLALight if self.form == 'light' else DynamicLABase
        return cls(site.out_chs, self.head_dim, drop_path, self.batch_coupled_gate, norm_layer=norm_layer, **dd)


def check_head_dim(owner: str, head_dim: Any, widths: Tuple[int, ...]) -> None:
    check_divisor(owner, 'head_dim', head_dim, divisors(math.gcd(*widths)),
                  f'channels per head: every block width {fmt_ints(widths)} must be divisible into heads')


def check_dsu_reduction(owner: str, reduction: Any, widths: Tuple[int, ...]) -> None:
    check_int(owner, 'dsu_reduction', reduction,
              allowed=f'a positive integer of at most {min(widths)} (the narrowest stage width)')
    if reduction > min(widths):
        raise ValueError(f'{owner}: dsu_reduction must be a positive integer of at most {min(widths)} '
                         f'(the narrowest stage width), got {reduction!r}')


# The model kwargs, each checked against the architecture before it applies.
_ARGS = (
    ModelArg('head_dim', 'strategy.head_dim', check=lambda v, x, a: check_head_dim(v, x, a.block_widths())),
    ModelArg('dsu_reduction', 'strategy.dsu_reduction',
             check=lambda v, x, a: check_dsu_reduction(v, x, a.block_widths())),
    ModelArg('batch_coupled_gate', 'strategy.batch_coupled_gate',
             check=lambda v, x, a: check_bool(v, 'batch_coupled_gate', x)),
)

# CIFAR (bgx666/KCLA cifar/models/cifar/dla_{l,b}.py): head dim 16, DSU reduction 4. ImageNet
# (tunantu/Dynamic-Layer-Attention image_classification/imagenet/models/resnet_dla_l.py): head dim 32, reduction 16.
_CIFAR = dict(light=DynamicLayerAttention('light', 16, 4), base=DynamicLayerAttention('base', 16, 4))
_IMAGENET_LIGHT = DynamicLayerAttention('light', 32, 16)


def _cifar_arch(depth: int, form: str) -> ResNetLACfg:
    n = (depth - 2) // 9
    return ResNetLACfg(layers=(n, n, n), channels=(16, 32, 64), stem_type='cifar', stem_width=16,
                       strategy=_CIFAR[form], zero_init_last=False)


light_cfgs = {
    **{f'cifar_resnet{d}_dynlal': _cifar_arch(d, 'light') for d in (20, 56, 110)},
    'resnet50_dynlal': ResNetLACfg(layers=(3, 4, 6, 3), strategy=_IMAGENET_LIGHT),
    'resnet101_dynlal': ResNetLACfg(layers=(3, 4, 23, 3), strategy=_IMAGENET_LIGHT),
}
base_cfgs = {f'cifar_resnet{d}_dynlab': _cifar_arch(d, 'base') for d in (20, 56, 110)}
model_cfgs = {**light_cfgs, **base_cfgs}


def _cifar(**kwargs) -> Dict[str, Any]:
    return cifar_cfg(CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, origin_url='https://github.com/bgx666/KCLA',
                     paper_ids='arXiv:2406.13392', **kwargs)


def _imagenet(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(origin_url='https://github.com/tunantu/Dynamic-Layer-Attention', paper_ids='arXiv:2406.13392',
                        **kwargs)


default_cfgs = generate_default_cfgs({
    f'{name}.untrained': _imagenet() if name.startswith('resnet') else _cifar() for name in model_cfgs})

register_family(Family('dynamic_la_light', 'Dynamic layer attention (light)', card='dynamic_la',
                       rules=dynamic_la.RULES['dynamic_la_light'], args=_ARGS), light_cfgs)
register_family(Family('dynamic_la_base', 'Dynamic layer attention (base)', card='dynamic_la',
                       rules=dynamic_la.RULES['dynamic_la_base'], args=_ARGS), base_cfgs)


@register_model
def cifar_resnet20_dynlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with DLA-light."""
    return build_model('cifar_resnet20_dynlal', pretrained, **kwargs)


@register_model
def cifar_resnet56_dynlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with DLA-light."""
    return build_model('cifar_resnet56_dynlal', pretrained, **kwargs)


@register_model
def cifar_resnet110_dynlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with DLA-light."""
    return build_model('cifar_resnet110_dynlal', pretrained, **kwargs)


@register_model
def cifar_resnet20_dynlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with DLA-base."""
    return build_model('cifar_resnet20_dynlab', pretrained, **kwargs)


@register_model
def cifar_resnet56_dynlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with DLA-base."""
    return build_model('cifar_resnet56_dynlab', pretrained, **kwargs)


@register_model
def cifar_resnet110_dynlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with DLA-base."""
    return build_model('cifar_resnet110_dynlab', pretrained, **kwargs)


@register_model
def resnet50_dynlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with DLA-light (head dim 32, DSU reduction 16)."""
    return build_model('resnet50_dynlal', pretrained, **kwargs)


@register_model
def resnet101_dynlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with DLA-light (head dim 32, DSU reduction 16)."""
    return build_model('resnet101_dynlal', pretrained, **kwargs)
