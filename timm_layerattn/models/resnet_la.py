"""ResNets with layer attention: KCLA, MRLA-light and MRLA-base on one ResNet skeleton.

Papers:
* `Enhancing Layer Interaction Using Key-Correlated Layer Attention` (KCLA) - code: github.com/bgx666/KCLA
* `Cross-Layer Retrospective Retrieving via Layer Attention` (MRLA, ICLR 2023) - https://arxiv.org/abs/2302.03985,
  code: github.com/joyfang1106/MRLA

The skeleton is a torchvision/timm v1.5 ResNet (stride on the 3x3 conv, timm parameter names, so timm
`resnet50` weights load into the trunk). Each block may own a layer-attention module; a list of tensors
(the attention *state*) is threaded explicitly through every block and stage, which is what lets KCLA
carry its history across stage boundaries and MRLA-base its key/value cache along a stage. Because of
that carried state, features are built on `forward_intermediates` (timm's `getter` feature wrapper),
never by re-running children one by one.

The same skeleton carries the other layer-interaction families of the package (each registered in its own
module): residual-free "plain" blocks, option-A (parameter-free) shortcuts, LayerNorm-ended blocks, optional
modules at a stage's entry / exit that follow the same `(x, state)` contract (CNNtention, AS_stages), a
network-level module shared by the sites of several blocks (attention shortcuts: `ASBottleneck` blocks
receive their width's projection weights at call time, so shared tensors are owned exactly once), and an
optional neck that reads every feature level (GradAttn's token encoder).
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, create_classifier, get_device_dtype
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers import LayerAttnCfg, create_layer_attn
from ..layers._checks import check_bool, check_choice, check_divisor, check_int, check_rate, divisors, fmt_ints
from ..layers.shortcut import (
    AttentionShortcut, ShortcutCfg, ShortcutProjections, ShortcutWeights, create_shortcut_site)
from ._builder import build_la_model

__all__ = [
    'ResNetLA', 'ResNetLACfg', 'LABottleneck', 'LABasicBlock', 'ASBottleneck', 'LAStage', 'PadShortcut',
    'checkpoint_filter_fn',
]

State = List[torch.Tensor]
# The network-level shared projections by site width, handed to every stage (see `ASBottleneck`).
SharedWeights = Dict[int, ShortcutWeights]


class LABottleneck(nn.Module):
    """ResNet v1.5 bottleneck whose output goes through an optional layer-attention module.

    Other families use it without the residual (`residual=False`: plain nets, attention shortcuts) and with a
    LayerNorm over channels in place of the last BN (`last_norm='ln'`, module `ln3`: attention shortcuts).
    """

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            expansion: int = 4,
            out_chs: Optional[int] = None,
            layer_attn: Optional[nn.Module] = None,
            residual: bool = True,
            last_norm: str = 'bn',
            last_act: bool = True,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        first_dilation = first_dilation or dilation
        out_chs = out_chs or planes * expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False, **dd)
        self.bn1 = norm_layer(planes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)
        self.bn3, self.ln3 = _last_norm(last_norm, out_chs, norm_layer, dd)
        self.act3 = act_layer(inplace=True) if last_act else nn.Identity()
        self.downsample = downsample
        self.residual = residual
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0. else None
        self.attn = layer_attn

    def zero_init_last(self) -> None:
        # Only a residual branch may start at zero; without the residual the block's output would be zero.
        if self.residual and self.bn3 is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward_trunk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block without its attention: `(output, residual input)`. A method of its own so that
        subclasses (`ASBottleneck`) reuse it: TorchScript has no `super().forward`."""
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.conv3(x)
        if self.bn3 is not None:
            x = self.bn3(x)
        if self.ln3 is not None:
            x = self.ln3(x)
        if self.downsample is not None:  # projected last, as timm: its output is not held through the convs
            shortcut = self.downsample(shortcut)
        if self.residual:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x += shortcut  # in place, as timm: no new full-size buffer
        return self.act3(x), shortcut

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        x, shortcut = self.forward_trunk(x)
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


class LABasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with an optional layer-attention module on its output.

    `residual=False` gives the plain block of GradAttn; an option-A `PadShortcut` as `downsample` the
    CIFAR ResNet of He et al. (CNNtention).
    """

    def __init__(
            self,
            in_chs: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            expansion: int = 1,
            out_chs: Optional[int] = None,
            layer_attn: Optional[nn.Module] = None,
            residual: bool = True,
            last_norm: str = 'bn',
            last_act: bool = True,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        first_dilation = first_dilation or dilation
        out_chs = out_chs or planes * expansion
        self.conv1 = nn.Conv2d(
            in_chs, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False, **dd)
        self.bn1 = norm_layer(planes, **dd)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=dilation, dilation=dilation, bias=False, **dd)
        self.bn2, self.ln2 = _last_norm(last_norm, out_chs, norm_layer, dd)
        self.act2 = act_layer(inplace=True) if last_act else nn.Identity()
        self.downsample = downsample
        self.residual = residual
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0. else None
        self.attn = layer_attn

    def zero_init_last(self) -> None:
        if self.residual and self.bn2 is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        if self.bn2 is not None:
            x = self.bn2(x)
        if self.ln2 is not None:
            x = self.ln2(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        if self.residual:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x += shortcut  # in place, as timm: no new full-size buffer
        x = self.act2(x)
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


def _last_norm(
        kind: str,
        chs: int,
        norm_layer: Type[nn.Module],
        dd: Dict[str, Any],
) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """`(bn, ln)` for a block's last norm: BatchNorm (timm names `bn2`/`bn3`) or LayerNorm over channels
    (`ln2`/`ln3`, eps 1e-5 as PyTorch's LayerNorm; attention shortcuts D12/D13)."""
    if kind == 'bn':
        return norm_layer(chs, **dd), None
    if kind == 'ln':
        return None, LayerNorm2d(chs, eps=1e-5, **dd)
    raise ValueError(f"last_norm must be 'bn' or 'ln', got {kind!r}")


class ASBottleneck(LABottleneck):
    """Attention-shortcut bottleneck (AS_out / AS_KV): `X_l = H_l(g_l(X_1, ..., X_{l-1}))`.

    `attn_in` is the site g_l in front of the convs, holding what is its own (query, cache adapters). The
    K/V/O projections it shares with every site of its width are owned by the network and passed in (as
    their weights, `ShortcutWeights`, which TorchScript can pass where it cannot pass a module), so they
    exist once in the state dict. H_l is the bottleneck without residual (built with `residual=False`,
    `last_norm='ln'`: paper §4.1, D2, D12).
    """

    def __init__(self, *args, site: AttentionShortcut, **kwargs):
        super().__init__(*args, **kwargs)
        self.attn_in = site

    def forward(self, x: torch.Tensor, state: State, proj: ShortcutWeights) -> Tuple[torch.Tensor, State]:
        x, state = self.attn_in.forward_weights(x, state, proj)
        x, _ = self.forward_trunk(x)  # a residual-free block without layer attention
        return x, state


class PadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016) for CIFAR: subsample with the stride, zero-pad the new channels
    (half before, half after the input's). No parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f'PadShortcut cannot reduce channels ({in_chs} -> {out_chs})')
        self.stride = stride
        self.pad_before = (out_chs - in_chs) // 2
        self.pad_after = out_chs - in_chs - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


def _checkpoint_block(block: nn.Module, x: torch.Tensor, state: State, *args: Any) -> Tuple[torch.Tensor, State]:
    """Activation-checkpoint one block, passing the carried state through as extra tensor arguments
    (`args`: further call arguments, e.g. a shared projection group's weights)."""
    def run(x: torch.Tensor, *state: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x, new_state = block(x, list(state), *args)
        return (x, *new_state)
    out = checkpoint(run, x, *state, use_reentrant=False)
    return out[0], list(out[1:])


class LAStage(nn.Sequential):
    """A stage: its units run in order, each receiving and returning the carried attention state.

    The units are the blocks (`0`, `1`, ...), optionally preceded by an entry module `attn_in` (AS_stages'
    site between stages) and followed by an exit module `attn` (CNNtention's attention after the stage); both
    follow the block contract `(x, state) -> (x, state)`, so they are checkpointed, pruned and scripted with
    the stage. As in any `nn.Sequential`, integer indexing counts every unit: address blocks by name
    (`stage.get_submodule('0')`, state-dict keys `layerS.i.*`) when a stage has an entry unit.

    Blocks with an attention-shortcut site (`ASBottleneck`, the units with an `attn_in`) also receive the
    weights of their width's shared projections from `shared`.
    """

    def __init__(self, *blocks: nn.Module, pre: Optional[nn.Module] = None, post: Optional[nn.Module] = None):
        units: 'OrderedDict[str, nn.Module]' = OrderedDict()
        if pre is not None:
            units['attn_in'] = pre
        units.update((str(i), block) for i, block in enumerate(blocks))
        if post is not None:
            units['attn'] = post
        super().__init__(units)
        self.grad_checkpointing = False

    def forward(
            self,
            x: torch.Tensor,
            state: State,
            shared: Optional[SharedWeights] = None,
    ) -> Tuple[torch.Tensor, State]:
        for block in self:
            if hasattr(block, 'attn_in'):  # a block site (static under TorchScript: one call form per unit)
                assert shared is not None, 'blocks with attention-shortcut sites need the shared projections'
                proj = shared[block.attn_in.dim]
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, state = _checkpoint_block(block, x, state, proj)
                else:
                    x, state = block(x, state, proj)
            elif self.grad_checkpointing and not torch.jit.is_scripting():
                x, state = _checkpoint_block(block, x, state)
            else:
                x, state = block(x, state)
        return x, state


_BLOCKS = {'bottleneck': (LABottleneck, 4), 'basic': (LABasicBlock, 1)}


@dataclass(frozen=True)
class ResNetLACfg:
    """Architecture of a layer-attention ResNet.

    Attributes:
        layers: Blocks per stage.
        channels: Bottleneck (inner) width per stage; block output width is `channels * expansion`.
        block: 'bottleneck' or 'basic'.
        expansion: Output width multiplier (default: 4 for bottleneck, 1 for basic).
        stem_type: '' (7x7/2 conv + 3x3/2 max-pool), 'deep' (three 3x3 convs + max-pool, timm
            `resnet50c` layout) or 'cifar' (one 3x3 conv, stride 1, no pooling).
        stem_width: Stem output width ('deep': width of the first two convs; output is twice that).
        attn: Layer attention, `None` for a plain ResNet.
        zero_init_last: Zero-init the last BN of each block (official ImageNet code yes, CIFAR code no).
        out_channels: Block output width per stage, overriding `channels * expansion` (e.g. AS_out's common
            width).
        residual: 'proj' (identity, or 1x1 conv + BN projection where the shape changes; timm/torchvision),
            'pad' (option A: parameter-free subsample + zero channel padding) or 'none' (no residual: plain
            nets, attention shortcuts).
        last_norm: 'bn' or 'ln' (LayerNorm over channels in place of each block's last BN).
        last_act: Activation after the last norm (attention shortcuts' `act_after_ln`).
        shortcut: Attention-shortcut strategy (`layers.shortcut.ShortcutCfg`): a site in front of every
            block (needs `residual='none'`) or between stages.
        stage_post: Builds the module run after each stage's blocks, `fn(stage_idx, channels, device, dtype)`
            returning a module with the block contract or `None`.
        neck: Builds the module that turns all feature levels into `forward_features`'s output,
            `fn(feature_chs, device, dtype)`; it has `num_features` and returns an NCHW map.
        stem_feat: Feature level 0: 'act' (stem activation, before the max-pool) or 'pool' (after it).
        name: The registered variant, named by error messages (the class name when empty).
    """
    layers: Tuple[int, ...]
    channels: Tuple[int, ...] = (64, 128, 256, 512)
    block: str = 'bottleneck'
    expansion: Optional[int] = None
    stem_type: str = ''
    stem_width: int = 64
    attn: Optional[LayerAttnCfg] = None
    zero_init_last: bool = True
    out_channels: Optional[Tuple[int, ...]] = None
    residual: str = 'proj'
    last_norm: str = 'bn'
    last_act: bool = True
    shortcut: Optional[ShortcutCfg] = None
    stage_post: Optional[Callable[..., Optional[nn.Module]]] = None
    neck: Optional[Callable[..., nn.Module]] = None
    stem_feat: str = 'act'
    name: str = ''

    def __post_init__(self):
        owner = self.name or 'ResNetLACfg'
        if not isinstance(self.layers, tuple) or not 3 <= len(self.layers) <= 4:
            raise ValueError(f'{owner}: layers must be a tuple of 3 or 4 stage depths, got {self.layers!r}')
        for depth in self.layers:
            check_int(owner, 'layers', depth, allowed='a tuple of positive stage depths')
        for field, widths in (('channels', self.channels), ('out_channels', self.out_channels)):
            if widths is None and field == 'out_channels':
                continue
            if not isinstance(widths, tuple) or len(widths) != len(self.layers):
                raise ValueError(
                    f'{owner}: {field} must be a tuple of {len(self.layers)} widths (one per stage), got {widths!r}')
            for width in widths:
                check_int(owner, field, width, allowed='a tuple of positive widths')
        check_choice(owner, 'block', self.block, tuple(_BLOCKS))
        if self.expansion is not None:
            check_int(owner, 'expansion', self.expansion)
        check_choice(owner, 'stem_type', self.stem_type, ('', 'deep', 'cifar'))
        check_int(owner, 'stem_width', self.stem_width)
        check_choice(owner, 'residual', self.residual, ('proj', 'pad', 'none'))
        check_choice(owner, 'last_norm', self.last_norm, ('bn', 'ln'))
        check_choice(owner, 'stem_feat', self.stem_feat, ('act', 'pool'))
        check_bool(owner, 'zero_init_last', self.zero_init_last)
        check_bool(owner, 'last_act', self.last_act)
        if self.attn is not None and not isinstance(self.attn, LayerAttnCfg):
            raise TypeError(f'{owner}: attn must be a LayerAttnCfg or None, got {self.attn!r}')
        if self.shortcut is not None and not isinstance(self.shortcut, ShortcutCfg):
            raise TypeError(f'{owner}: shortcut must be a ShortcutCfg or None, got {self.shortcut!r}')

    def block_widths(self) -> Tuple[Tuple[int, ...], Tuple[int, int]]:
        """`(block output width per stage, (stem output width, block expansion))`."""
        expansion = self.expansion or _BLOCKS[self.block][1]
        widths = self.out_channels or tuple(c * expansion for c in self.channels)
        stem = self.stem_width * 2 if self.stem_type == 'deep' else self.stem_width
        return widths, (stem, expansion)


# Global pooling types of timm's `SelectAdaptivePool2d` ('' for none).
POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax')


def _check_head_dim(owner: str, head_dim: int, attn: LayerAttnCfg, widths: Tuple[int, ...]) -> None:
    """Every block must split into whole heads and, for KCLA, every stage's incoming history (a different
    width) into as many groups as the stage's blocks have heads."""
    transitions = [(a, b) for a, b in zip(widths[:-1], widths[1:]) if a != b] \
        if attn.type == 'kcla' and 0 in attn.rebuild_blocks else []
    valid = [d for d in divisors(math.gcd(*widths)) if all(a % (b // d) == 0 for a, b in transitions)]
    why = f'channels per head: every block width {fmt_ints(widths)} must be divisible into heads'
    if transitions:
        why += ", and KCLA projects each stage's incoming history in as many groups"
    check_divisor(owner, 'head_dim', head_dim, valid, why)


def _check_shortcut_heads(owner: str, sc: ShortcutCfg, site_widths: List[int]) -> None:
    g = math.gcd(*site_widths)
    why = f'attention heads: every attention-shortcut site width {fmt_ints(sorted(set(site_widths)))} must be ' \
          f'divisible into heads'
    check_divisor(owner, 'as_heads (ShortcutCfg.num_heads)', sc.num_heads, divisors(g), why)


def _site_widths(cfg: ResNetLACfg) -> List[int]:
    """Input width of every attention-shortcut site: each block's input, or each later stage's input."""
    widths, (inplanes, _) = cfg.block_widths()
    if cfg.shortcut is not None and cfg.shortcut.placement == 'stage':
        return list(widths[:-1])
    inputs = []
    for width, depth in zip(widths, cfg.layers):
        for _ in range(depth):
            inputs.append(inplanes)
            inplanes = width
    return inputs


def _make_downsample(
        kind: str,
        in_chs: int,
        out_chs: int,
        stride: int,
        norm_layer: Type[nn.Module],
        dd: Dict[str, Any],
) -> Optional[nn.Module]:
    """The residual path of a stage's first block where the shape changes (`None`: identity or no residual)."""
    if kind == 'none' or (stride == 1 and in_chs == out_chs):
        return None
    if kind == 'pad':
        return PadShortcut(in_chs, out_chs, stride)
    if kind == 'proj':
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd), norm_layer(out_chs, **dd))
    raise ValueError(f"residual must be 'proj', 'pad' or 'none', got {kind!r}")


class ResNetLA(nn.Module):
    """ResNet skeleton with pluggable layer-interaction strategies (per block, per stage, network-level)."""

    def __init__(
            self,
            cfg: ResNetLACfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: Optional[float] = None,
            head_dim: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cfg: Architecture.
            num_classes: Classifier outputs (0 for no classifier).
            in_chans: Input image channels.
            global_pool: Global pooling type ('' for none).
            output_stride: 32, 16 or 8 (ImageNet stem); later stages are dilated instead of strided.
            drop_rate: Dropout before the classifier.
            drop_path_rate: With layer attention: drop-path rate of the attention branch, constant over depth
                as in the official models (the trunk residual is never dropped); `None`: the strategy's
                default (KCLA 0.2, MRLA 0). Without: stochastic depth of the residual branches, rising
                linearly to this rate over the blocks (timm's rule); an error for nets without residuals.
            head_dim: Override the attention head dim (e.g. 64 for the released KCLA code's default).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if not isinstance(cfg, ResNetLACfg):
            raise TypeError(f'{type(self).__name__}: cfg must be a ResNetLACfg, got {cfg!r}')
        name = cfg.name or type(self).__name__
        num_classes = check_int(name, 'num_classes', num_classes, minimum=0,
                                allowed='a non-negative integer (0: no classifier)')
        in_chans = check_int(name, 'in_chans', in_chans)
        check_choice(name, 'global_pool', global_pool, POOL_TYPES)
        output_stride = check_int(name, 'output_stride', output_stride, allowed='one of 8, 16, 32')
        if output_stride not in (8, 16, 32):
            raise ValueError(f'{name}: output_stride must be one of 8, 16, 32, got {output_stride!r}')
        drop_rate = check_rate(name, 'drop_rate', drop_rate)
        if drop_path_rate is not None:
            drop_path_rate = check_rate(name, 'drop_path_rate', drop_path_rate)
        attn_cfg = cfg.attn
        widths, _ = cfg.block_widths()
        if head_dim is not None:
            if attn_cfg is None:
                raise ValueError(f'{name}: head_dim is only valid for models with layer attention, got {head_dim!r}')
            _check_head_dim(name, head_dim, attn_cfg, widths)
            attn_cfg = replace(attn_cfg, head_dim=head_dim)
        elif attn_cfg is not None:
            _check_head_dim(name, attn_cfg.head_dim, attn_cfg, widths)
        if drop_path_rate is None:
            drop_path_rate = attn_cfg.drop_path if attn_cfg is not None else 0.
        if drop_path_rate and attn_cfg is None and cfg.residual == 'none':
            raise ValueError(
                f'{name}: drop_path_rate must be 0 for this model (it has no residual branch to drop), '
                f'got {drop_path_rate!r}')
        block_sites = cfg.shortcut is not None and cfg.shortcut.placement == 'block'
        if block_sites and (cfg.block != 'bottleneck' or cfg.residual != 'none' or attn_cfg is not None):
            raise ValueError("attention shortcuts in front of blocks need block='bottleneck', residual='none' "
                             "and no layer attention")
        if cfg.shortcut is not None:
            _check_shortcut_heads(name, cfg.shortcut, _site_widths(cfg))
        self.cfg = replace(cfg, attn=attn_cfg)
        self._name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        block_cls, default_expansion = _BLOCKS[cfg.block]
        if block_sites:
            block_cls = ASBottleneck
        expansion = cfg.expansion or default_expansion
        norm_layer = nn.BatchNorm2d

        # Stem
        cifar_stem = cfg.stem_type == 'cifar'
        if cfg.stem_type == 'deep':
            inplanes = cfg.stem_width * 2
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, cfg.stem_width, 3, stride=2, padding=1, bias=False, **dd),
                norm_layer(cfg.stem_width, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(cfg.stem_width, cfg.stem_width, 3, padding=1, bias=False, **dd),
                norm_layer(cfg.stem_width, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(cfg.stem_width, inplanes, 3, padding=1, bias=False, **dd),
            )
        elif cifar_stem:
            inplanes = cfg.stem_width
            self.conv1 = nn.Conv2d(in_chans, inplanes, 3, padding=1, bias=False, **dd)
        elif cfg.stem_type == '':
            inplanes = cfg.stem_width
            self.conv1 = nn.Conv2d(in_chans, inplanes, 7, stride=2, padding=3, bias=False, **dd)
        else:
            raise ValueError(f'Unknown stem_type {cfg.stem_type!r}')
        self.bn1 = norm_layer(inplanes, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem_pooled = cfg.stem_feat == 'pool'
        stem_reduction = (1 if cifar_stem else 2) * (2 if self.stem_pooled and not cifar_stem else 1)
        self.feature_info = [dict(
            num_chs=inplanes, reduction=stem_reduction, module='maxpool' if self.stem_pooled else 'act1')]

        # Stages
        net_stride = 1 if cifar_stem else 4
        dilation = prev_dilation = 1
        prev_chs: Optional[int] = None  # width of the previous block's output, None before the first block
        block_site: Optional[Tuple[int, int]] = None  # (input width, stride) of the previous block with a site
        stage_site: Optional[Tuple[int, int]] = None  # (input width, stride) of the previous stage
        site_dims: List[int] = []
        total_blocks, block_id = sum(cfg.layers), 0
        self.stage_names: Tuple[str, ...] = tuple(f'layer{i + 1}' for i in range(len(cfg.layers)))
        for stage_idx, (planes, depth) in enumerate(zip(cfg.channels, cfg.layers)):
            stride = 1 if stage_idx == 0 else 2
            if net_stride >= output_stride:
                dilation *= stride
                stride = 1
            else:
                net_stride *= stride
            out_chs = cfg.out_channels[stage_idx] if cfg.out_channels else planes * expansion
            pre = None
            if cfg.shortcut is not None and cfg.shortcut.placement == 'stage' and stage_idx > 0:
                # Stage s's input is g(X_1 .. X_{s-1}) over the earlier stages' outputs (AS_stages, D16).
                cache_dim, cache_stride = stage_site if stage_site is not None else (None, 1)
                pre = create_shortcut_site(cfg.shortcut, inplanes, cache_dim, cache_stride, **dd)
                stage_site = (inplanes, stride)
            downsample = _make_downsample(cfg.residual, inplanes, out_chs, stride, norm_layer, dd)
            blocks = []
            for block_idx in range(depth):
                block_stride = stride if block_idx == 0 else 1
                layer_attn = create_layer_attn(
                    attn_cfg, out_chs, prev_chs, block_idx, block_stride, drop_path_rate, norm_layer=norm_layer, **dd)
                block_kwargs: Dict[str, Any] = {}
                if block_sites:
                    cache_dim, cache_stride = block_site if block_site is not None else (None, 1)
                    block_kwargs['site'] = create_shortcut_site(cfg.shortcut, inplanes, cache_dim, cache_stride, **dd)
                    block_site = (inplanes, block_stride)
                    site_dims.append(inplanes)
                block_dpr = 0. if attn_cfg is not None else drop_path_rate * block_id / max(total_blocks - 1, 1)
                blocks.append(block_cls(
                    inplanes, planes, block_stride,
                    downsample=downsample if block_idx == 0 else None,
                    dilation=dilation,
                    first_dilation=prev_dilation,
                    expansion=expansion,
                    out_chs=out_chs,
                    layer_attn=layer_attn,
                    residual=cfg.residual != 'none',
                    last_norm=cfg.last_norm,
                    last_act=cfg.last_act,
                    drop_path=block_dpr,
                    norm_layer=norm_layer,
                    **block_kwargs,
                    **dd,
                ))
                prev_dilation = dilation
                inplanes = prev_chs = out_chs
                block_id += 1
            post = cfg.stage_post(stage_idx, out_chs, **dd) if cfg.stage_post is not None else None
            self.add_module(self.stage_names[stage_idx], LAStage(*blocks, pre=pre, post=post))
            self.feature_info.append(dict(num_chs=out_chs, reduction=net_stride, module=self.stage_names[stage_idx]))

        # Network-level module shared by the blocks' sites: one K/V/O group per site width.
        self.as_proj: Optional[ShortcutProjections] = None
        if block_sites:
            shared_q = cfg.shortcut.q_proj == 'shared'
            queried = [site.attn_in.dim for stage in self.stages() for site in stage if site.attn_in.has_query]
            self.as_proj = ShortcutProjections(site_dims, queried if shared_q else (), **dd)

        # Neck (reads every feature level) and head
        self.num_features = inplanes
        self.neck: Optional[nn.Module] = None
        if cfg.neck is not None:
            self.neck = cfg.neck([f['num_chs'] for f in self.feature_info], **dd)
            self.num_features = self.neck.num_features
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        self.init_weights(zero_init_last=cfg.zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Official init: kaiming fan-out for every Conv2d, BN 1/0, optionally zero last BN per block.

        Attention-specific 1-D convs, linears and MRLA's lambda keep their own init; so do LayerNorms (1/0).
        Residual-free blocks never zero their last norm (their output would be zero).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (LABottleneck, LABasicBlock)):
                    m.zero_init_last()

    @torch.jit.ignore
    def stages(self) -> List[LAStage]:
        return [getattr(self, n) for n in self.stage_names]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # A block's attention module lives inside the block, so `layerS.i` covers it. A stage's entry module
        # gets its own group before the stage's first block, its exit module joins the stage's last block;
        # the network-level shared projections join the stem (the first site already uses them).
        blocks = r'^layer(\d+)' if coarse else [
            (r'^layer(\d+)\.attn_in\.', (-1,)),
            (r'^layer(\d+)\.(\d+)', None),
            (r'^layer(\d+)\.attn\.', (99999,)),  # timm's MATCH_PREV_GROUP
        ]
        return dict(stem=r'^conv1|bn1|maxpool|as_proj', blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        num_classes = check_int(self._name, 'num_classes', num_classes, minimum=0,
                                allowed='a non-negative integer (0: no classifier)')
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        check_choice(self._name, 'global_pool', global_pool, POOL_TYPES)
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _check_input(self, x: torch.Tensor) -> None:
        # torch._assert stays traceable (fx) and scriptable; messages must not format traced values. Shapes and
        # dtype only: no data is read. An empty batch (B == 0) is valid and gives an empty output.
        torch._assert(x.dim() == 4, f'{self._name} expects a 4-D input [B, {self.in_chans}, H, W]')
        torch._assert(x.shape[1] == self.in_chans, f'{self._name} expects {self.in_chans} input channels')
        torch._assert(
            x.is_floating_point(),
            f'{self._name} expects a floating-point input (convert integer images with .float() and normalise them)')
        torch._assert(x.shape[2] * x.shape[3] > 0, f'{self._name} expects a non-empty image (H > 0 and W > 0)')

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return x

    def _shared_weights(self) -> Optional[SharedWeights]:
        """The shared projections' weights for the stages (`None` without block-placed attention shortcuts)."""
        if self.as_proj is None:
            return None
        return self.as_proj.weights()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the stem output (index 0) and stage outputs (1..N) selected by `indices`."""
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be NCHW, got {output_fmt!r}')
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.forward_stem(x)
        if not self.stem_pooled:
            stem = x
        x = self.maxpool(x)
        if self.stem_pooled:
            stem = x
        feats = [stem]
        stages = self.stages()
        if stop_early:
            stages = stages[:max_index]
        state: State = []
        shared = self._shared_weights()
        for stage in stages:
            x, state = stage(x, state, shared)
            feats.append(x)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        if self.neck is not None and len(stages) == len(self.stage_names):
            x = self.neck(feats)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages, neck and head that the selected intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, LAStage())
        if max_index == 0 and not self.stem_pooled:
            self.maxpool = nn.Identity()
        if self.as_proj is not None:
            self.as_proj.prune(block.attn_in for stage in self.stages() for block in stage)
        stage_sites = [stage.attn_in for stage in self.stages() if isinstance(getattr(stage, 'attn_in', None),
                                                                            AttentionShortcut)]
        if len(stage_sites) == 1:
            stage_sites[0].drop_key()
        prune_end = max_index < len(self.stage_names)
        if self.neck is not None and (prune_head or prune_end):
            self.neck = None
            self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.forward_stem(x)
        keep = self.neck is not None  # only a neck reads every level; otherwise let each be freed early
        feats: List[torch.Tensor] = []
        if keep and not self.stem_pooled:
            feats.append(x)
        x = self.maxpool(x)
        if keep and self.stem_pooled:
            feats.append(x)
        state: State = []
        shared = self._shared_weights()
        if torch.jit.is_scripting():
            x, state = self.layer1(x, state, shared)
            feats.append(x)
            x, state = self.layer2(x, state, shared)
            feats.append(x)
            x, state = self.layer3(x, state, shared)
            feats.append(x)
            if hasattr(self, 'layer4'):
                x, state = self.layer4(x, state, shared)
                feats.append(x)
        else:
            for stage in self.stages():
                x, state = stage(x, state, shared)
                if keep:
                    feats.append(x)
        if self.neck is not None:
            x = self.neck(feats)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Official checkpoint layouts -> this package. Rules apply in order to every key (after `module.` stripping).
# Trunk keys are shared with timm/torchvision except where the official code nests stages differently.
_OFFICIAL_KEY_RULES: Tuple[Tuple[str, Any], ...] = (
    # KCLA ImageNet: trunk and attention cells live in parallel containers of each stage.
    (r'^(layer\d+)\.layers\.(\d+)\.', r'\1.\2.'),
    (r'^(layer\d+)\.attention\.(\d+)\.', r'\1.\2.attn.'),
    # KCLA CIFAR / MRLA-B (ImageNet and CIFAR): `stages.s.i` is `layer{s+1}.i`.
    (r'^stages\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.'),
    (r'\.kcla\.', '.attn.'),
    # MRLA: module `mrla` (holding `mrla.W*` and `lambda_t`) and `bn_mrla` in the block.
    (r'\.mrla\.mrla\.W([qkv])\.', r'.attn.\1.'),
    (r'\.mrla\.lambda_t$', '.attn.lambda_t'),
    (r'\.bn_mrla\.', '.attn.norm.'),
    # KCLA cell internals.
    (r'\.attn\.W([qkv])\.', r'.attn.\1.'),
    (r'\.attn\.head_att\.', '.attn.head_gate.'),
    (r'\.attn\.bn_attention\.', '.attn.norm.'),
    (r'\.attn\.adjust_channel\.', '.attn.hist_proj.'),
    (r'\.attn\.u_Wk\.', '.attn.hist_k.'),
    (r'\.attn\.u_bn\.', '.attn.hist_norm.'),
)
# Official modules that exist but never run (spec layer_attention.md Q3); dropped when the model lacks them.
_OFFICIAL_UNUSED = re.compile(r'\.attn\.(hist_proj|hist_k|hist_norm)\.')


def _is_official_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(re.search(r'(\.layers\.\d+\.|\.attention\.\d+\.|^stages\.|\.mrla\.|\.bn_mrla\.|\.kcla\.)', k)
               for k in state_dict)


def remap_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename official KCLA / MRLA checkpoint keys to this package's layout (no other change)."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _OFFICIAL_KEY_RULES:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: unwrap containers, strip `module.`, remap official layouts.

    A checkpoint already in this package's layout passes through unchanged. Official KCLA / MRLA
    checkpoints (training-script files) are renamed, `norm_d` is reshaped to its 1-D buffer form and
    the official modules that never run (unused KCLA init-cell parts) are dropped.
    """
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {(k[7:] if k.startswith('module.') else k): v for k, v in state_dict.items()}
    if not _is_official_layout(state_dict):
        return state_dict
    model_sd = model.state_dict()
    out = {}
    for k, v in remap_official_keys(state_dict).items():
        if k not in model_sd and _OFFICIAL_UNUSED.search(k):
            continue
        if k.endswith('.attn.norm_d'):
            v = v.reshape(-1)
        out[k] = v
    return out


def _create_resnet_la(variant: str, pretrained: bool = False, **kwargs) -> ResNetLA:
    cfg = replace(model_cfgs[variant], name=variant)
    return build_la_model(ResNetLA, variant, pretrained, cfg, checkpoint_filter_fn, **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0',
        **kwargs,
    }


def _kcla_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(origin_url='https://github.com/bgx666/KCLA', **kwargs)


def _mrla_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(origin_url='https://github.com/joyfang1106/MRLA', paper_ids='arXiv:2302.03985', **kwargs)


_KCLA = LayerAttnCfg('kcla', head_dim=32, drop_path=0.2, rebuild_blocks=(0, 11))
_MRLA_L = LayerAttnCfg('mrla_light', head_dim=32)
_MRLA_B = LayerAttnCfg('mrla_base', head_dim=16)

model_cfgs = dict(
    resnet50_kcla=ResNetLACfg(layers=(3, 4, 6, 3), attn=_KCLA),
    resnet101_kcla=ResNetLACfg(layers=(3, 4, 23, 3), attn=_KCLA),
    resnet50_mrlal=ResNetLACfg(layers=(3, 4, 6, 3), attn=_MRLA_L),
    resnet101_mrlal=ResNetLACfg(layers=(3, 4, 23, 3), attn=_MRLA_L),
    resnet50_mrlab=ResNetLACfg(layers=(3, 4, 6, 3), stem_type='deep', stem_width=32, attn=_MRLA_B),
    resnet101_mrlab=ResNetLACfg(layers=(3, 4, 23, 3), stem_type='deep', stem_width=32, attn=_MRLA_B),
)

default_cfgs = generate_default_cfgs({
    'resnet50_kcla.untrained': _kcla_cfg(),
    'resnet101_kcla.untrained': _kcla_cfg(),
    'resnet50_mrlal.untrained': _mrla_cfg(),
    'resnet101_mrlal.untrained': _mrla_cfg(),
    'resnet50_mrlab.untrained': _mrla_cfg(first_conv='conv1.0'),
    'resnet101_mrlab.untrained': _mrla_cfg(first_conv='conv1.0'),
})


@register_model
def resnet50_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with Key-Correlated Layer Attention (head dim 32 as in the paper)."""
    return _create_resnet_la('resnet50_kcla', pretrained, **kwargs)


@register_model
def resnet101_kcla(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with Key-Correlated Layer Attention (head dim 32 as in the paper)."""
    return _create_resnet_la('resnet101_kcla', pretrained, **kwargs)


@register_model
def resnet50_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 with MRLA-light."""
    return _create_resnet_la('resnet50_mrlal', pretrained, **kwargs)


@register_model
def resnet101_mrlal(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 with MRLA-light."""
    return _create_resnet_la('resnet101_mrlal', pretrained, **kwargs)


@register_model
def resnet50_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-50 (deep stem) with MRLA-base."""
    return _create_resnet_la('resnet50_mrlab', pretrained, **kwargs)


@register_model
def resnet101_mrlab(pretrained: bool = False, **kwargs) -> ResNetLA:
    """ResNet-101 (deep stem) with MRLA-base."""
    return _create_resnet_la('resnet101_mrlab', pretrained, **kwargs)
