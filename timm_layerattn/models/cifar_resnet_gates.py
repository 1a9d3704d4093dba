"""The channel-gate baselines of the KCLA paper's CIFAR table: SE, ECA and DIANet on the bottleneck CIFAR ResNets.

Papers:
* `Squeeze-and-Excitation Networks` (Hu et al., CVPR 2018) - https://arxiv.org/abs/1709.01507
* `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks` (Wang et al., CVPR 2020) -
  https://arxiv.org/abs/1910.03151
* `DIANet: Dense-and-Implicit Attention Network` (Huang et al., AAAI 2020) - https://arxiv.org/abs/1905.10671
Code of these baselines: github.com/bgx666/KCLA (`cifar/models/cifar/{senet,ecanet,dia_resnet}.py`).

The trunk is `cifar_resnet_la`'s (3x3 stem of width 16, bottleneck stages of 16/32/64 planes, n = (depth - 2) / 9
blocks per stage). One strategy, `ChannelGates`, puts a gate on every block's residual branch between its last
BN and the residual add (`layerS.i.attn_pre`); DIANet's cell, shared by a stage's blocks, is the stage's entry
unit (`layerS.attn_in`) and travels to them with the carried state (`layers/gates.py`). The official SE
Bottleneck skips SE on blocks of 256 channels or more (its last stage): those SE layers are not built here.
Maths and decisions: docs/design/channel_gates.md.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Type

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ..checkpoints import gates as gate_rules
from ..core.strategy import BlockSite, LayerStrategy, StageSite
from ..core.units import Dd
from ..families import Family, cifar_cfg, register_family
from ..layers.gates import DIACell, DIAGate, EcaGate, SEGate
from ..layers._checks import check_choice, check_int
from ._builder import build_model
from .cifar_resnet_la import CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD
from .resnet_la import HEAD_DIM
from .resnet_trunk import ResNetLA, ResNetLACfg

__all__ = ['ChannelGates', 'GATE_FAMILIES']

_KINDS = ('se', 'eca', 'dia')


@dataclass(frozen=True)
class ChannelGates(LayerStrategy):
    """A channel gate on every block's residual branch: 'se', 'eca' or 'dia' (DIANet).

    Attributes:
        kind: The gate.
        reduction: SE's squeeze ratio (C -> C / reduction).
        max_chs: Gate only blocks narrower than this (`None`: every block). The official SE Bottleneck's
            `C < 256` rule: its SE layers of 256 channels are built but never run, so not built here.
    """
    kind: str
    reduction: int = 16
    max_chs: Optional[int] = None

    def __post_init__(self):
        check_choice('ChannelGates', 'kind', self.kind, _KINDS)
        check_int('ChannelGates', 'reduction', self.reduction)
        if self.max_chs is not None:
            check_int('ChannelGates', 'max_chs', self.max_chs)

    def _gated(self, chs: int) -> bool:
        return self.max_chs is None or chs < self.max_chs

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        return DIACell(site.out_chs, **dd) if self.kind == 'dia' and self._gated(site.out_chs) else None

    def block_pre_residual(self, site: BlockSite, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        if not self._gated(site.out_chs):
            return None
        if self.kind == 'se':
            return SEGate(site.out_chs, self.reduction, **dd)
        if self.kind == 'eca':
            return EcaGate(site.out_chs, **dd)
        return DIAGate()


_GATES = dict(
    se=ChannelGates('se', max_chs=gate_rules.SE_SKIP_CHS),  # the official SE Bottleneck's rule
    eca=ChannelGates('eca'),
    dia=ChannelGates('dia'),
)


def _cifar_arch(depth: int, kind: str) -> ResNetLACfg:
    n = (depth - 2) // 9
    return ResNetLACfg(
        layers=(n, n, n), channels=(16, 32, 64), stem_type='cifar', stem_width=16, strategy=_GATES[kind],
        zero_init_last=False)


model_cfgs = {f'cifar_resnet{depth}_{kind}': _cifar_arch(depth, kind) for kind in _KINDS for depth in (20, 56, 110)}

_PAPERS = dict(se='arXiv:1709.01507', eca='arXiv:1910.03151', dia='arXiv:1905.10671')


def _cfg(kind: str) -> Dict[str, Any]:
    return cifar_cfg(CIFAR_DEFAULT_MEAN, CIFAR_DEFAULT_STD, paper_ids=_PAPERS[kind],
                     origin_url='https://github.com/bgx666/KCLA')


default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg(name.rsplit('_', 1)[1]) for name in model_cfgs})

# One family per gate (each has its own official layout); `head_dim` is taken only to refuse it with a reason, as
# by the plain CIFAR baselines (it is the layer-attention nets' kwarg).
GATE_FAMILIES = {
    'se': Family('se', 'SE', card='channel_gates', rules=gate_rules.RULES['se'], args=(HEAD_DIM,)),
    'eca': Family('eca', 'ECA', card='channel_gates', rules=gate_rules.RULES['eca'], args=(HEAD_DIM,)),
    'dia': Family('dianet', 'DIANet', card='channel_gates', rules=gate_rules.RULES['dianet'], args=(HEAD_DIM,)),
}
for _kind, _family in GATE_FAMILIES.items():
    register_family(_family, {n: c for n, c in model_cfgs.items() if n.endswith('_' + _kind)})


@register_model
def cifar_resnet20_se(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with SE on the residual branches of its first two stages."""
    return build_model('cifar_resnet20_se', pretrained, **kwargs)


@register_model
def cifar_resnet56_se(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with SE on the residual branches of its first two stages."""
    return build_model('cifar_resnet56_se', pretrained, **kwargs)


@register_model
def cifar_resnet110_se(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with SE on the residual branches of its first two stages."""
    return build_model('cifar_resnet110_se', pretrained, **kwargs)


@register_model
def cifar_resnet20_eca(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with ECA on every residual branch."""
    return build_model('cifar_resnet20_eca', pretrained, **kwargs)


@register_model
def cifar_resnet56_eca(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with ECA on every residual branch."""
    return build_model('cifar_resnet56_eca', pretrained, **kwargs)


@register_model
def cifar_resnet110_eca(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with ECA on every residual branch."""
    return build_model('cifar_resnet110_eca', pretrained, **kwargs)


@register_model
def cifar_resnet20_dia(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-20 (bottleneck) with DIANet: one LSTM-like gate cell per stage, shared by its blocks."""
    return build_model('cifar_resnet20_dia', pretrained, **kwargs)


@register_model
def cifar_resnet56_dia(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-56 (bottleneck) with DIANet: one LSTM-like gate cell per stage, shared by its blocks."""
    return build_model('cifar_resnet56_dia', pretrained, **kwargs)


@register_model
def cifar_resnet110_dia(pretrained: bool = False, **kwargs) -> ResNetLA:
    """CIFAR ResNet-110 (bottleneck) with DIANet: one LSTM-like gate cell per stage, shared by its blocks."""
    return build_model('cifar_resnet110_dia', pretrained, **kwargs)
