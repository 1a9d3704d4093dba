"""EfficientNet-B0/B1/B2 with MRLA-light cells, on timm's own EfficientNet.

Paper: `Cross-Layer Retrospective Retrieving via Layer Attention` (MRLA, ICLR 2023) - https://arxiv.org/abs/2302.03985,
code: github.com/joyfang1106/MRLA (the EfficientNet models live in its timm 0.4.9 fork, `timm/models/
efficientnet_mrla.py`, removed from the tree in commit 2915aff).

timm's `EfficientNet` builds the trunk (stem, blocks, head, init, intermediates, pruning, grad checkpointing); this
module then adds one MRLA-light cell (`layers.MRLALight`, the ResNet cell's maths) to every `InvertedResidual`
that has a skip, on its output after the residual add, with the block's shortcut standing in for the previous
layer-attention output. MRLA-light carries no state, so blocks stay ordinary `x -> x` modules and everything timm
offers for the trunk keeps working. Placement, maths and every decision: docs/design/efficientnet_layer_attention.md.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import get_act_layer, get_device_dtype
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, efficientnet_init_weights, round_channels
from timm.models.efficientnet import EfficientNet

from ..checkpoints import efficientnet_mrla
from ..core.strategy import BlockSite, LayerStrategy
from ..core.units import Dd
from ..families import Family, ModelArg, imagenet_cfg, register_family
from ..layers import MRLALight
from ..layers._checks import check_divisor, check_rate, divisors, fmt_ints
from ._builder import build_model, register_trunk
from ._contract import check_image, check_trunk_args, classifier_head

__all__ = ['EfficientNetLA', 'EfficientNetLACfg', 'MRLALightCells', 'InvertedResidualMRLA', 'CheckedStemConv']

# EfficientNet-B0, as in timm's and the official `_gen_efficientnet`: (type, repeats, kernel, stride, expansion,
# output channels, SE ratio) per stage in timm's block-string notation; B1 / B2 scale depth and width.
EFFICIENTNET_ARCH = (
    ('ds_r1_k3_s1_e1_c16_se0.25',),
    ('ir_r2_k3_s2_e6_c24_se0.25',),
    ('ir_r2_k5_s2_e6_c40_se0.25',),
    ('ir_r3_k3_s2_e6_c80_se0.25',),
    ('ir_r3_k5_s1_e6_c112_se0.25',),
    ('ir_r4_k5_s2_e6_c192_se0.25',),
    ('ir_r1_k3_s1_e6_c320_se0.25',),
)


@dataclass(frozen=True)
class EfficientNetLACfg:
    """Architecture of an EfficientNet trunk (timm's block strings, scaled) and its layer strategy.

    Attributes:
        arch_def: timm block strings, one tuple per stage.
        channel_multiplier, depth_multiplier: EfficientNet's width / depth scaling.
        stem_size, num_features: Stem and head widths before width scaling.
        act_layer: Activation of the whole trunk (timm name).
        strategy: The cells placed on the blocks with a skip; `None` for a plain EfficientNet.
        name: The registered variant (set by the builder), for error messages.
    """
    arch_def: Tuple[Tuple[str, ...], ...] = EFFICIENTNET_ARCH
    channel_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    stem_size: int = 32
    num_features: int = 1280
    act_layer: str = 'swish'
    strategy: Optional[LayerStrategy] = None
    name: str = ''
    num_feature_levels: int = 5  # the stem (or first stage) and the four strided stages, timm's feature levels

    def round_chs(self, channels: int) -> int:
        return round_channels(channels, self.channel_multiplier)

    def block_args(self) -> List[List[Dict[str, Any]]]:
        """timm's decoded block arguments per stage (depth-scaled; widths not yet rounded)."""
        return decode_arch_def([list(s) for s in self.arch_def], self.depth_multiplier)

    def _blocks(self) -> List[Tuple[str, int, int, int]]:
        """(type, input width, output width, stride) of every block, in network order."""
        out, in_chs = [], self.round_chs(self.stem_size)
        for stage in self.block_args():
            for i, ba in enumerate(stage):
                out_chs = self.round_chs(ba['out_chs'])
                out.append((ba['block_type'], in_chs, out_chs, ba['stride'] if i == 0 else 1))
                in_chs = out_chs
        return out

    def block_widths(self) -> Tuple[int, ...]:
        return tuple(self.round_chs(stage[0]['out_chs']) for stage in self.block_args())

    def block_inputs(self) -> List[int]:
        return [b[1] for b in self._blocks()]

    def cell_widths(self) -> Tuple[int, ...]:
        """Widths of the blocks that get a cell (InvertedResidual with a skip), each once."""
        return tuple(sorted({o for t, i, o, s in self._blocks() if t == 'ir' and i == o and s == 1}))


@dataclass(frozen=True)
class MRLALightCells(LayerStrategy):
    """An MRLA-light cell on every block with a skip. The official code fixes the number of heads (8 per cell,
    so a cell's head dim is its width / 8); `head_dim` instead fixes the channels per head, as the ResNets do.

    Attributes:
        num_heads: Heads per cell; `None` with `head_dim` unset means the official 8.
        head_dim: Channels per head in every cell (exclusive with `num_heads`).
    """
    num_heads: Optional[int] = None
    head_dim: Optional[int] = None

    def heads(self, width: int) -> int:
        if self.head_dim is not None:
            return width // self.head_dim
        return self.num_heads if self.num_heads is not None else 8

    def check(self, cfg: EfficientNetLACfg, owner: str) -> None:
        if self.num_heads is not None and self.head_dim is not None:
            raise ValueError(f'{owner}: give num_heads or head_dim, not both, got num_heads={self.num_heads!r} '
                             f'and head_dim={self.head_dim!r}')
        widths = cfg.cell_widths()
        if self.head_dim is not None:
            check_cell_split(owner, 'head_dim', self.head_dim, widths)
        else:
            check_cell_split(owner, 'num_heads', self.heads(0), widths)

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        return MRLALight(site.out_chs, head_dim=site.out_chs // self.heads(site.out_chs), drop_path=drop_path,
                         norm_layer=norm_layer, **dd)


def check_cell_split(owner: str, name: str, value: Any, widths: Tuple[int, ...]) -> None:
    """`num_heads` / `head_dim` must split every cell width into whole heads."""
    what = 'heads per cell' if name == 'num_heads' else 'channels per head'
    check_divisor(owner, name, value, divisors(math.gcd(*widths)),
                  f'{what}: every cell width {fmt_ints(widths)} must be divisible into heads')


class InvertedResidualMRLA(InvertedResidual):
    """timm's `InvertedResidual` with an MRLA-light cell (`attn`) on its output, for blocks with a skip.

    The cell reads the block output after the residual add, `x_t`, and the block's input, which stands in for
    the previous layer-attention output `o_{t-1}` (the official placement). `forward_block` restates timm's forward
    because TorchScript cannot call `super().forward`; `tests/test_efficientnet_la.py` holds the two equal.
    """

    @classmethod
    def from_block(cls, block: InvertedResidual, attn: nn.Module) -> 'InvertedResidualMRLA':
        """Give a block that timm's builder made its cell, keeping its modules, parameters and init: the builder
        has no hook for a block class, and building the block again would restate its arguments."""
        if type(block) is not InvertedResidual or not block.has_skip:
            raise TypeError(f'{cls.__name__}: only an InvertedResidual with a skip takes a cell, got {block!r}')
        block.__class__ = cls
        block.attn = attn
        return block

    def forward_block(self, x: torch.Tensor) -> torch.Tensor:
        """timm's `InvertedResidual.forward` (with the skip)."""
        shortcut = x
        if self.conv_s2d is not None:
            x = self.conv_s2d(x)
            x = self.bn_s2d(x)
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        return self.drop_path(x) + shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(self.forward_block(x), x, [])
        return out


class CheckedStemConv(nn.Conv2d):
    """The stem conv, refusing inputs that cannot be images of the model with one line (`torch._assert` stays
    traceable and scriptable), so `forward`, `forward_features`, `forward_intermediates` and features all check."""

    def __init__(self, conv: nn.Conv2d, name: str):
        if type(conv) is not nn.Conv2d:
            raise TypeError(f'{type(self).__name__}: expects the plain nn.Conv2d stem of pad_type \'\', got {conv!r}')
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                         device='meta')
        self.weight, self.bias = conv.weight, conv.bias
        self.model_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(self.model_name, self.in_channels, x)
        return self._conv_forward(x, self.weight, self.bias)


class EfficientNetLA(EfficientNet):
    """timm's `EfficientNet` with a layer strategy's cells on its blocks with a skip (`EfficientNetLACfg`)."""

    def __init__(
            self,
            cfg: EfficientNetLACfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cfg: Architecture.
            num_classes: Classifier outputs (0 for no classifier).
            in_chans: Input image channels.
            global_pool: Global pooling type ('' for none).
            output_stride: 32, 16 or 8; later stages are dilated instead of strided.
            drop_rate: Dropout before the classifier.
            drop_path_rate: timm's stochastic depth of the blocks' residual branches, rising linearly over the
                blocks; each cell drops its branch at its block's rate (the official rule).
        """
        dd = {'device': device, 'dtype': dtype}
        if not isinstance(cfg, EfficientNetLACfg):
            raise TypeError(f'{type(self).__name__}: cfg must be an EfficientNetLACfg, got {cfg!r}')
        name = cfg.name or type(self).__name__
        num_classes, in_chans, output_stride, drop_rate = check_trunk_args(
            name, num_classes, in_chans, global_pool, output_stride, drop_rate)
        drop_path_rate = check_rate(name, 'drop_path_rate', drop_path_rate)
        strategy = cfg.strategy
        if strategy is not None:
            strategy.check(cfg, name)
        norm_layer = nn.BatchNorm2d
        round_chs_fn = partial(round_channels, multiplier=cfg.channel_multiplier)
        super().__init__(
            cfg.block_args(), num_classes=num_classes, num_features=round_chs_fn(cfg.num_features),
            in_chans=in_chans, stem_size=cfg.stem_size, output_stride=output_stride, round_chs_fn=round_chs_fn,
            act_layer=get_act_layer(cfg.act_layer), norm_layer=norm_layer, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, global_pool=global_pool, **dd)
        self.cfg = cfg
        self._name = name
        self.conv_stem = CheckedStemConv(self.conv_stem, name)
        if strategy is not None:
            self._add_cells(strategy, norm_layer, dd)
            strategy.init_weights(self)

    def _add_cells(self, strategy: LayerStrategy, norm_layer: Type[nn.Module], dd: Dd) -> None:
        """Ask the strategy for a cell at every InvertedResidual with a skip (the official placement) and give it
        to the block; the cells take timm's EfficientNet init, as the official cells do."""
        blocks = [(s, i, b) for s, stage in enumerate(self.blocks) for i, b in enumerate(stage)]
        prev, prev_chs, in_chs = None, None, self.conv_stem.out_channels
        for block_id, (s, i, block) in enumerate(blocks):
            out_chs = block.feature_info('bottleneck')['num_chs']
            conv_dw = getattr(block, 'conv_dw', None)
            site = BlockSite(
                stage_idx=s, block_idx=i, block_id=block_id, num_blocks=len(blocks), in_chs=in_chs, out_chs=out_chs,
                prev_chs=prev_chs, stride=conv_dw.stride[0] if conv_dw is not None else 1, prev=prev)
            if type(block) is InvertedResidual and block.has_skip:
                rate = float(getattr(block.drop_path, 'drop_prob', 0.))
                attn = strategy.block_attn(site, rate, norm_layer, dd)
                if attn is not None:
                    efficientnet_init_weights(attn)
                    InvertedResidualMRLA.from_block(block, attn)
            prev, prev_chs, in_chs = site, out_chs, out_chs

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'classifier' if name_only else self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes, self.global_pool, self.classifier = classifier_head(
            self._name, self.num_features, num_classes, global_pool, self.global_pool.pool_type, self.training,
            get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()


register_trunk(EfficientNetLACfg, EfficientNetLA)


def _check_split_arg(name: str):
    def check(variant: str, value: Any, arch: EfficientNetLACfg) -> None:
        check_cell_split(variant, name, value, arch.cell_widths())
    return check


def _cfg(**kwargs) -> Dict[str, Any]:
    return imagenet_cfg(
        first_conv='conv_stem', classifier='classifier', interpolation='bicubic',
        origin_url='https://github.com/joyfang1106/MRLA', paper_ids='arXiv:2302.03985', **kwargs)


_MRLA_L = MRLALightCells()

model_cfgs = dict(
    efficientnet_b0_mrlal=EfficientNetLACfg(strategy=_MRLA_L),
    efficientnet_b1_mrlal=EfficientNetLACfg(depth_multiplier=1.1, strategy=_MRLA_L),
    efficientnet_b2_mrlal=EfficientNetLACfg(channel_multiplier=1.1, depth_multiplier=1.2, strategy=_MRLA_L),
)

# The official pretrained cfgs (input size, crop) of `efficientnet_mrla_b{0,1,2}`.
default_cfgs = generate_default_cfgs({
    'efficientnet_b0_mrlal.untrained': _cfg(),
    'efficientnet_b1_mrlal.untrained': _cfg(input_size=(3, 240, 240), pool_size=(8, 8), crop_pct=0.882),
    'efficientnet_b2_mrlal.untrained': _cfg(
        input_size=(3, 256, 256), pool_size=(8, 8), test_input_size=(3, 288, 288), crop_pct=1.0),
})

register_family(Family(
    'efficientnet_mrla_light', 'MRLA-light (EfficientNet)', card='efficientnet_mrla_l', rules=efficientnet_mrla.RULES,
    args=(ModelArg('num_heads', 'strategy.num_heads', check=_check_split_arg('num_heads')),
          ModelArg('head_dim', 'strategy.head_dim', check=_check_split_arg('head_dim')))), model_cfgs)


@register_model
def efficientnet_b0_mrlal(pretrained: bool = False, **kwargs) -> EfficientNetLA:
    """EfficientNet-B0 with MRLA-light (8 heads per cell)."""
    return build_model('efficientnet_b0_mrlal', pretrained, **kwargs)


@register_model
def efficientnet_b1_mrlal(pretrained: bool = False, **kwargs) -> EfficientNetLA:
    """EfficientNet-B1 with MRLA-light (8 heads per cell)."""
    return build_model('efficientnet_b1_mrlal', pretrained, **kwargs)


@register_model
def efficientnet_b2_mrlal(pretrained: bool = False, **kwargs) -> EfficientNetLA:
    """EfficientNet-B2 with MRLA-light (8 heads per cell)."""
    return build_model('efficientnet_b2_mrlal', pretrained, **kwargs)
