"""CIFAR layer-attention ResNets: the bottleneck nets (depth 9n+2) of the official KCLA / MRLA CIFAR code.

"ResNet-20/56/110" here means the layer-attention papers' CIFAR nets: a 3x3 stem of width 16 and three
bottleneck stages of 16/32/64 planes (x4 outputs: 64/128/256 channels at 32/16/8 px), n = (depth - 2) / 9
blocks per stage, global average pooling (the official `AvgPool2d(8)` equals it at 32 px; here any
input size >= 8 px works). Attention head dim 16; KCLA re-summarises its history at each stage's first
block only (no block-11 rule, unlike the ImageNet code). No zero-init of the last BN (official CIFAR init).
"""
from typing import Any, Dict

from timm.models import generate_default_cfgs, register_model

from ..checkpoints import kcla_mrla
from ..families import Family, cifar_cfg, register_family
from ..layers import LayerAttnCfg
from ._builder import build_model
from .resnet_la import HEAD_DIM, BlockAttention, register_la_models
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['CIFAR_DEFAULT_MEAN', 'CIFAR_DEFAULT_STD']

# Normalisation of the official CIFAR training script (bgx666/KCLA cifar/cifar.py).
CIFAR_DEFAULT_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_DEFAULT_STD = (0.2023, 0.1994, 0.2010)

_ATTN = dict(
    kcla=BlockAttention(LayerAttnCfg('kcla', head_dim=16, drop_path=0.2, rebuild_blocks=(0,))),
    mrlal=BlockAttention(LayerAttnCfg('mrla_light', head_dim=16)),
    mrlab=BlockAttention(LayerAttnCfg('mrla_base', head_dim=16)),
)


def _cifar_arch(depth: int, attn: str = '') -> ResNetLACfg:
    n = (depth - 2) // 9
    return ResNetLACfg(
        layers=(n, n, n), channels=(16, 32, 64), stem_type='cifar', stem_width=16,
        strategy=_ATTN[attn] if attn else None, zero_init_last=False)


model_cfgs = {
    f'cifar_resnet{depth}{"_" + attn if attn else ""}': _cifar_arch(depth, attn)
    for depth in (20, 56, 110) for attn in ('', 'kcla', 'mrlal', 'mrlab')
}


def _cfg(**kwargs) -> Dict[str, Any]:
    return cifar_cfg(CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, origin_url='https://github.com/bgx666/KCLA', **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})

register_la_models(model_cfgs, __name__)
# The plain nets take `head_dim` only to refuse it with a reason (it is the layer-attention nets' kwarg).
register_family(
    Family('cifar_resnet', 'CIFAR ResNet', card='cifar_resnet', rules=kcla_mrla.TRUNK_RULES, args=(HEAD_DIM,)),
    {name: cfg for name, cfg in model_cfgs.items() if cfg.strategy is None})


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck, 2 blocks per stage), the layer-attention papers' baseline."""
    return build_model('cifar_resnet20', pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck, 6 blocks per stage)."""
    return build_model('cifar_resnet56', pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck, 12 blocks per stage)."""
    return build_model('cifar_resnet110', pretrained, **kwargs)


@register_model
def cifar_resnet20_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 with KCLA."""
    return build_model('cifar_resnet20_kcla', pretrained, **kwargs)


@register_model
def cifar_resnet56_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 with KCLA."""
    return build_model('cifar_resnet56_kcla', pretrained, **kwargs)


@register_model
def cifar_resnet110_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 with KCLA."""
    return build_model('cifar_resnet110_kcla', pretrained, **kwargs)


@register_model
def cifar_resnet20_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 with MRLA-light."""
    return build_model('cifar_resnet20_mrlal', pretrained, **kwargs)


@register_model
def cifar_resnet56_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 with MRLA-light."""
    return build_model('cifar_resnet56_mrlal', pretrained, **kwargs)


@register_model
def cifar_resnet110_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 with MRLA-light."""
    return build_model('cifar_resnet110_mrlal', pretrained, **kwargs)


@register_model
def cifar_resnet20_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 with MRLA-base."""
    return build_model('cifar_resnet20_mrlab', pretrained, **kwargs)


@register_model
def cifar_resnet56_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 with MRLA-base."""
    return build_model('cifar_resnet56_mrlab', pretrained, **kwargs)


@register_model
def cifar_resnet110_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 with MRLA-base."""
    return build_model('cifar_resnet110_mrlab', pretrained, **kwargs)
