"""ResNets with recurrent layer aggregation (RLA-Net, the RLAg rows of the KCLA paper's Tables II / III).

Paper: `Recurrence along Depth: Deep Convolutional Neural Networks with Recurrent Layer Aggregation` (Zhao,
Fang, Li; NeurIPS 2021) - https://arxiv.org/abs/2110.11852, code and published weights:
github.com/joyfang1106/RLANet.

The strategy (`RecurrentAggregation`) places the modules of `layers.rla` on the `ResNetLA` trunk: each stage's
entry unit owns the stage's shared convs, each block reads the hidden stream through its conv input and updates
it on its output, and the neck concatenates the final stream before the classifier. The maths, the official
code's quirks and every decision are in docs/design/rla.md.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Type

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import rla as rla_rules
from ..core.strategy import BlockSite, LayerStrategy, StageSite, Trunk, TrunkCfg
from ..core.units import Dd
from ..families import Family, ModelArg, imagenet_cfg, register_family
from ..layers._checks import check_int
from ..layers.rla import RLAConcat, RLANeck, RLAStageConvs, RLAUpdate
from ._builder import build_model
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['RecurrentAggregation']


@dataclass(frozen=True)
class RecurrentAggregation(LayerStrategy):
    """RLA-Net's hidden stream of `rla_chs` channels (the paper's k), read and updated by every block."""
    rla_chs: int = 32

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        check_int(owner, 'rla_channel', self.rla_chs)

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        return RLAStageConvs(site.out_chs, self.rla_chs, **dd)

    def block_conv_input(self, site: BlockSite, dd: Dd) -> Optional[nn.Module]:
        return RLAConcat(self.rla_chs)

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        return RLAUpdate(self.rla_chs, pool=site.stride, norm_layer=norm_layer, **dd)

    def neck(self, feature_chs: List[int], dd: Dd) -> Optional[nn.Module]:
        return RLANeck(len(feature_chs), feature_chs[-1], self.rla_chs, **dd)

    def prune(self, model: Trunk) -> None:
        # Without the neck, the stream's last update feeds nothing (docs/design/rla.md#rla-prune).
        if getattr(model, 'neck', None) is not None:
            return
        stages = [stage for stage in model.stages() if stage.blocks()]
        if stages:
            stages[-1].blocks()[-1].attn = None


def _check_rla_channel(variant: str, value: Any, arch: ResNetLACfg) -> None:
    check_int(variant, 'rla_channel', value)


def _rla_cfg(**kwargs: Any) -> Dict[str, Any]:
    # The official evaluation: Resize(256) + CenterCrop(224), bilinear (torchvision's default), ImageNet mean / std.
    return imagenet_cfg(
        origin_url='https://github.com/joyfang1106/RLANet', paper_ids='arXiv:2110.11852',
        paper_name='Recurrence along Depth: Deep Convolutional Neural Networks with Recurrent Layer Aggregation',
        license=None, **kwargs)


def _published(top1: float, drive_id: str, file: str) -> Dict[str, Any]:
    """The tag of weights RLA-Net published (Google Drive / Baidu, behind a confirmation page, so not fetched
    by timm): download once, then convert or load through the model's filter (docs/design/rla.md#rla-weights)."""
    return _rla_cfg(notes=(
        f'Published by the RLA-Net authors (ImageNet top-1 {top1:.2f}%): '
        f'https://drive.google.com/file/d/{drive_id}/view ({file}); '
        f'convert with `timm-layerattn convert <file> <out.safetensors> --model <arch>`, or load the file as it is '
        f'with pretrained_cfg_overlay=dict(file=<file>).',))


_RLA = RecurrentAggregation(32)

model_cfgs = dict(
    resnet50_rla=ResNetLACfg(layers=(3, 4, 6, 3), strategy=_RLA),
    resnet101_rla=ResNetLACfg(layers=(3, 4, 23, 3), strategy=_RLA),
)

default_cfgs = generate_default_cfgs({
    'resnet50_rla.rlanet_in1k': _published(77.17, '1cetP1SdOiwznLxlBUaHG8Q8c4RIwToWW', 'resnet50_rla_2283'),
    'resnet50_rla.untrained': _rla_cfg(),
    'resnet101_rla.rlanet_in1k': _published(78.52, '1V9Iv0KbN1O92ll8rcf45kLkD9EOA9VCE', 'resnet101_rla_2148'),
    'resnet101_rla.untrained': _rla_cfg(),
})

register_family(Family(
    'rla', 'RLA-Net', card='rla', rules=rla_rules.RULES,
    args=(ModelArg('rla_channel', path='strategy.rla_chs', check=_check_rla_channel),)), model_cfgs)


@register_model
def resnet50_rla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with recurrent layer aggregation (RLA-Net, stream width 32)."""
    return build_model('resnet50_rla', pretrained, **kwargs)


@register_model
def resnet101_rla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with recurrent layer aggregation (RLA-Net, stream width 32)."""
    return build_model('resnet101_rla', pretrained, **kwargs)
