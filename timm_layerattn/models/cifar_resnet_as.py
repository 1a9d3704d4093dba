"""The attention-shortcut paper's CIFAR models: AS_out-Net-50, AS_KV-Net-50, AS_stages-ResNet-50 and the
baselines ResNet-50, ResNet-50 0.5x and plain ResNet-50, all with the paper's 3x3 stem (no max-pool).

Paper: `Introducing attention shortcuts in convolutional neural networks` (D. Erroz, M. Galar, AIMS 2025),
Table 1 (architectures, parameter counts for 10 classes) and Table 2 (CIFAR-10/100 errors). The nets
stride to 4x4 at 32 px. No zero-init of the last BN (the 2016 ResNet recipe the paper follows;
docs/design/attention_shortcuts.md#as-init).
See `resnet_as` for the architecture and the model kwargs (`as_dim`, `as_heads`, `q_proj`, `kv_adapter`,
`act_after_ln`, `pre_ln`).
"""
from typing import Any, Dict

from timm.models import generate_default_cfgs, register_model

from ..families import cifar_cfg, register_family
from ._builder import build_model
from .cifar_resnet_la import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .resnet_as import AS_FAMILY, AS_PAPER, as_arch
from .resnet_trunk import ResNetLA

__all__ = []

model_cfgs = {
    f'cifar_resnet50{"_" + kind if kind else ""}': as_arch(kind, 50, stem_type='cifar', zero_init_last=False)
    for kind in ('as_out', 'as_kv', 'as_stages', '', 'half', 'plain')
}


def _cfg(**kwargs) -> Dict[str, Any]:
    return cifar_cfg(CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, pool_size=(4, 4), paper_name=AS_PAPER, **kwargs)


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in model_cfgs})
register_family(AS_FAMILY, model_cfgs)


@register_model
def cifar_resnet50_as_out(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_out-Net-50 (paper Table 1: 12.7M; common width 128, subsampled cache), CIFAR stem."""
    return build_model('cifar_resnet50_as_out', pretrained, **kwargs)


@register_model
def cifar_resnet50_as_kv(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_KV-Net-50 (paper Table 1: 16.2M; widths 1/4 of ResNet-50, K/V cache adapters), CIFAR stem."""
    return build_model('cifar_resnet50_as_kv', pretrained, **kwargs)


@register_model
def cifar_resnet50_as_stages(pretrained: bool = False, **kwargs) -> ResNetLA:
    """AS_stages-ResNet-50 (ResNet-50 with attention over earlier stage outputs between stages), CIFAR stem."""
    return build_model('cifar_resnet50_as_stages', pretrained, **kwargs)


@register_model
def cifar_resnet50(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 (torchvision/timm v1.5 bottlenecks) with the CIFAR stem: the AS paper's baseline (23.5M)."""
    return build_model('cifar_resnet50', pretrained, **kwargs)


@register_model
def cifar_resnet50_half(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 0.5x (block output widths halved), CIFAR stem: the AS paper's reduced baseline."""
    return build_model('cifar_resnet50_half', pretrained, **kwargs)


@register_model
def cifar_resnet50_plain(pretrained: bool = False, **kwargs) -> ResNetLA:
    """Plain ResNet-50 (no skip connections), CIFAR stem: the AS paper's no-shortcut baseline."""
    return build_model('cifar_resnet50_plain', pretrained, **kwargs)
