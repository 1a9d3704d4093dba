"""ResNets with per-block layer attention: KCLA, MRLA-light and MRLA-base (ImageNet depths).

Papers:
* `Enhancing Layer Interaction Using Key-Correlated Layer Attention` (KCLA) - code: github.com/bgx666/KCLA
* `Cross-Layer Retrospective Retrieving via Layer Attention` (MRLA, ICLR 2023) - https://arxiv.org/abs/2302.03985,
  code: github.com/joyfang1106/MRLA

The strategy (`BlockAttention`) attaches one layer-attention module to every block of the `ResNetLA`
skeleton; the modules carry their state (KCLA's history, MRLA-base's key / value cache, ...) from block to
block, across stage boundaries where the family does. The maths and every decision are in
docs/design/layer_attention.md (#la-kcla, #la-mrla-light, #la-mrla-base). The CIFAR depths are in
`cifar_resnet_la`.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import kcla_mrla
from ..core.strategy import BlockSite, LayerStrategy, TrunkCfg
from ..core.units import Dd
from ..families import Family, ModelArg, imagenet_cfg, register_family
from ..layers import LayerAttnCfg, create_layer_attn
from ..layers._checks import check_divisor, divisors, fmt_ints
from ..layers.kcla import KCLAVariant
from ._builder import build_model
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = [
    'BlockAttention', 'checkpoint_filter_fn', 'LA_FAMILIES', 'HEAD_DIM', 'KCLA_ARGS', 'kcla_arg', 'layer_attn_of',
]


@dataclass(frozen=True)
class BlockAttention(LayerStrategy):
    """One layer-attention module (`LayerAttnCfg.type`: KCLA, MRLA-light, MRLA-base) on every block's output."""
    attn: LayerAttnCfg

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        check_head_dim(owner, self.attn.head_dim, self.attn, cfg.block_widths())

    def branch_drop_path(self) -> Optional[float]:
        return self.attn.drop_path

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        return create_layer_attn(
            self.attn, site.out_chs, site.prev_chs, site.block_idx, site.stride, drop_path, norm_layer=norm_layer, **dd)


def check_head_dim(owner: str, head_dim: int, attn: LayerAttnCfg, widths: Tuple[int, ...]) -> None:
    """Every block must split into whole heads and, for KCLA, every stage's incoming history (a different
    width) into as many groups as the stage's blocks have heads."""
    transitions = [(a, b) for a, b in zip(widths[:-1], widths[1:]) if a != b] \
        if attn.carries_across_stages else []
    valid = [d for d in divisors(math.gcd(*widths)) if all(a % (b // d) == 0 for a, b in transitions)]
    why = f'channels per head: every block width {fmt_ints(widths)} must be divisible into heads'
    if transitions:
        why += ", and KCLA projects each stage's incoming history in as many groups"
    check_divisor(owner, 'head_dim', head_dim, valid, why)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: unwrap containers and wrapper prefixes, rename official KCLA / MRLA
    layouts (a checkpoint in this package's layout passes through unchanged)."""
    return kcla_mrla.TRUNK_RULES.filter(state_dict, model)


def layer_attn_of(cfg: ResNetLACfg) -> Optional[LayerAttnCfg]:
    """The layer attention of an architecture, `None` for one without."""
    return cfg.strategy.attn if isinstance(cfg.strategy, BlockAttention) else None


def _check_head_dim_arg(variant: str, head_dim: Any, arch: ResNetLACfg) -> None:
    attn = layer_attn_of(arch)
    if attn is None:
        raise ValueError(f'{variant}: head_dim is only valid for models with layer attention, got {head_dim!r}')
    check_head_dim(variant, head_dim, attn, arch.block_widths())  # before LayerAttnCfg's own, generic check


# `head_dim` overrides the attention's head dim (e.g. 64 for the released KCLA code's default).
HEAD_DIM = ModelArg('head_dim', path='strategy.attn.head_dim', check=_check_head_dim_arg)


def kcla_arg(name: str) -> ModelArg:
    """The model kwarg of `KCLAVariant` field `name` (KCLA's Table V ablations), for any architecture whose
    `strategy.attn.kcla` is a `KCLAVariant` (docs/design/layer_attention.md#la-kcla-ablations)."""
    return ModelArg(name, path=f'strategy.attn.kcla.{name}',
                    check=lambda variant, value, arch: KCLAVariant.check_field(variant, name, value))


# Before `head_dim`, whose check depends on `cross_stage`.
KCLA_ARGS = tuple(kcla_arg(name) for name in ('temperatures', 'key_exp', 'head_attn', 'form', 'cross_stage'))


def _la_family(kind: str, title: str, card: str) -> Family:
    args = (*KCLA_ARGS, HEAD_DIM) if kind == 'kcla' else (HEAD_DIM,)
    return Family(kind, title, card=card, rules=kcla_mrla.RULES[kind], args=args)


# The layer-attention families, by `LayerAttnCfg.type` (the CIFAR module registers its variants too).
LA_FAMILIES = {
    'kcla': _la_family('kcla', 'KCLA', 'kcla'),
    'mrla_light': _la_family('mrla_light', 'MRLA-light', 'mrla_l'),
    'mrla_base': _la_family('mrla_base', 'MRLA-base', 'mrla_b'),
}


def register_la_models(cfgs: Dict[str, ResNetLACfg], module: str) -> None:
    """Attach each layer-attention variant of model module `module` to its family (by attention type)."""
    for name, cfg in cfgs.items():
        attn = layer_attn_of(cfg)
        if attn is not None:
            register_family(LA_FAMILIES[attn.type], {name: cfg}, module=module)


def _kcla_cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(origin_url='https://github.com/bgx666/KCLA', **kwargs)


def _mrla_cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(origin_url='https://github.com/joyfang1106/MRLA', paper_ids='arXiv:2302.03985', **kwargs)


_KCLA = BlockAttention(LayerAttnCfg('kcla', head_dim=32, drop_path=0.2, rebuild_blocks=(0, 11)))
_MRLA_L = BlockAttention(LayerAttnCfg('mrla_light', head_dim=32))
_MRLA_B = BlockAttention(LayerAttnCfg('mrla_base', head_dim=16))

# BasicBlock nets: no official ImageNet code exists for them (the official BasicBlock cells are CIFAR-only), so
# they take the ImageNet families' head dims and timm's resnet18 / resnet34 trunk, 7x7 stem included for MRLA-base
# too, so that timm's weights warm-start them (docs/design/layer_attention.md#la-basic-imagenet).
_BASIC = dict(block='basic')

model_cfgs = dict(
    resnet18_kcla=ResNetLACfg(layers=(2, 2, 2, 2), **_BASIC, strategy=_KCLA),
    resnet34_kcla=ResNetLACfg(layers=(3, 4, 6, 3), **_BASIC, strategy=_KCLA),
    resnet18_mrlal=ResNetLACfg(layers=(2, 2, 2, 2), **_BASIC, strategy=_MRLA_L),
    resnet34_mrlal=ResNetLACfg(layers=(3, 4, 6, 3), **_BASIC, strategy=_MRLA_L),
    resnet18_mrlab=ResNetLACfg(layers=(2, 2, 2, 2), **_BASIC, strategy=_MRLA_B),
    resnet34_mrlab=ResNetLACfg(layers=(3, 4, 6, 3), **_BASIC, strategy=_MRLA_B),
    resnet50_kcla=ResNetLACfg(layers=(3, 4, 6, 3), strategy=_KCLA),
    resnet101_kcla=ResNetLACfg(layers=(3, 4, 23, 3), strategy=_KCLA),
    resnet50_mrlal=ResNetLACfg(layers=(3, 4, 6, 3), strategy=_MRLA_L),
    resnet101_mrlal=ResNetLACfg(layers=(3, 4, 23, 3), strategy=_MRLA_L),
    resnet50_mrlab=ResNetLACfg(layers=(3, 4, 6, 3), stem_type='deep', stem_width=32, strategy=_MRLA_B),
    resnet101_mrlab=ResNetLACfg(layers=(3, 4, 23, 3), stem_type='deep', stem_width=32, strategy=_MRLA_B),
)

default_cfgs = generate_default_cfgs({
    **{f'resnet{d}_{a}.untrained': _kcla_cfg() if a == 'kcla' else _mrla_cfg()
       for d in (18, 34) for a in ('kcla', 'mrlal', 'mrlab')},
    'resnet50_kcla.untrained': _kcla_cfg(),
    'resnet101_kcla.untrained': _kcla_cfg(),
    'resnet50_mrlal.untrained': _mrla_cfg(),
    'resnet101_mrlal.untrained': _mrla_cfg(),
    'resnet50_mrlab.untrained': _mrla_cfg(first_conv='conv1.0'),
    'resnet101_mrlab.untrained': _mrla_cfg(first_conv='conv1.0'),
})

register_la_models(model_cfgs, __name__)


@register_model
def resnet18_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-18 (BasicBlock) with Key-Correlated Layer Attention (head dim 32)."""
    return build_model('resnet18_kcla', pretrained, **kwargs)


@register_model
def resnet34_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-34 (BasicBlock) with Key-Correlated Layer Attention (head dim 32)."""
    return build_model('resnet34_kcla', pretrained, **kwargs)


@register_model
def resnet18_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-18 (BasicBlock) with MRLA-light (head dim 32)."""
    return build_model('resnet18_mrlal', pretrained, **kwargs)


@register_model
def resnet34_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-34 (BasicBlock) with MRLA-light (head dim 32)."""
    return build_model('resnet34_mrlal', pretrained, **kwargs)


@register_model
def resnet18_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-18 (BasicBlock, timm's 7x7 stem) with MRLA-base (head dim 16)."""
    return build_model('resnet18_mrlab', pretrained, **kwargs)


@register_model
def resnet34_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-34 (BasicBlock, timm's 7x7 stem) with MRLA-base (head dim 16)."""
    return build_model('resnet34_mrlab', pretrained, **kwargs)


@register_model
def resnet50_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with Key-Correlated Layer Attention (head dim 32 as in the paper)."""
    return build_model('resnet50_kcla', pretrained, **kwargs)


@register_model
def resnet101_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with Key-Correlated Layer Attention (head dim 32 as in the paper)."""
    return build_model('resnet101_kcla', pretrained, **kwargs)


@register_model
def resnet50_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with MRLA-light."""
    return build_model('resnet50_mrlal', pretrained, **kwargs)


@register_model
def resnet101_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with MRLA-light."""
    return build_model('resnet101_mrlal', pretrained, **kwargs)


@register_model
def resnet50_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 (deep stem) with MRLA-base."""
    return build_model('resnet50_mrlab', pretrained, **kwargs)


@register_model
def resnet101_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 (deep stem) with MRLA-base."""
    return build_model('resnet101_mrlab', pretrained, **kwargs)
