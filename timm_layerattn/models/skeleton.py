"""The ResNet skeleton every family of this package builds on, with a pluggable layer-interaction strategy.

The network is a torchvision / timm v1.5 ResNet (stride on the 3x3 conv, timm parameter names, so timm
`resnet50` weights load into the trunk). What makes a family is its `LayerStrategy`: the modules it adds at
fixed places of the skeleton, all optional:

* a block's *attention*, run on the block output: `attn(x, shortcut, state) -> (x, state)` (KCLA, MRLA);
* a block's *entry*, run before the block's convs: `attn_in(x, state, shared) -> (x, state)` (attention
  shortcuts in front of every block);
* a stage's entry / exit unit, with the block contract `(x, state, shared) -> (x, state)` (attention
  shortcuts between stages, CNNtention's attention after each stage);
* a network-level module whose tensors `shared_tensors()` are handed to every unit at call time, so that
  tensors used by many sites are owned once (the shared projections of attention shortcuts);
* a neck that turns every feature level into `forward_features`'s output (GradAttn's token encoder).

A list of tensors, the attention *state*, is threaded explicitly through every unit. Its meaning belongs
to the strategy (a history summary, a key / value cache, ...); the skeleton only carries it. That carried
state is why features are built on `forward_intermediates` (timm's `getter` feature wrapper), never by
re-running children one by one. docs/architecture.md draws the whole picture.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, create_classifier, get_device_dtype
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from ..layers._checks import check_bool, check_choice, check_int, check_rate
from ..layers.lean import drop_path_keep

__all__ = [
    'ResNetLA', 'ResNetLACfg', 'LayerStrategy', 'BlockSite', 'StageSite', 'LABottleneck', 'LABasicBlock',
    'LAStage', 'PadShortcut', 'make_stages', 'POOL_TYPES',
]

State = List[torch.Tensor]
Shared = List[torch.Tensor]
Dd = Dict[str, Any]

# Global pooling types of timm's `SelectAdaptivePool2d` ('' for none).
POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax')


# ---------------------------------------------------------------------------------------------------------------
# Configs and the strategy interface
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSite:
    """Where a block sits, as a strategy sees it when it builds the block's modules.

    Attributes:
        stage_idx: Stage index (0-based). block_idx: Index within the stage. block_id: Index in the network.
        num_blocks: Blocks in the network.
        in_chs: Block input width. out_chs: Block output width.
        prev_chs: Output width of the previous block, `None` for the network's first block.
        stride: Spatial stride of the block (1 when dilated).
        prev: The previous block's site, `None` for the first block.
    """
    stage_idx: int
    block_idx: int
    block_id: int
    num_blocks: int
    in_chs: int
    out_chs: int
    prev_chs: Optional[int]
    stride: int
    prev: Optional['BlockSite'] = None


@dataclass(frozen=True)
class StageSite:
    """Where a stage sits: its index, input / output width, stride (1 when dilated) and the previous stage."""
    stage_idx: int
    in_chs: int
    out_chs: int
    stride: int
    prev: Optional['StageSite'] = None


class LayerStrategy:
    """What a family plugs into the skeleton. Every hook is optional; the defaults add nothing.

    Concrete strategies are frozen dataclasses (they are part of the frozen `ResNetLACfg`). Hooks receive
    `dd`, the `device` / `dtype` factory kwargs, and return modules following the contracts in the module
    docstring, or `None`.
    """

    def check(self, cfg: 'ResNetLACfg', owner: str) -> None:
        """Reject an architecture the strategy cannot run on (`owner` names the model in the message)."""

    def branch_drop_path(self) -> Optional[float]:
        """Default drop-path rate of the strategy's own branch, or `None` when the strategy has no branch of
        its own: then `drop_path_rate` is stochastic depth of the trunk's residual branches."""
        return None

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        """Attention on a block's output, `(x, shortcut, state) -> (x, state)`."""
        return None

    def block_entry(self, site: BlockSite, dd: Dd) -> Optional[nn.Module]:
        """Module in front of a block's convs, `(x, state, shared) -> (x, state)`."""
        return None

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        """Unit before a stage's first block, `(x, state, shared) -> (x, state)`."""
        return None

    def stage_exit(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        """Unit after a stage's last block, `(x, state, shared) -> (x, state)`."""
        return None

    def network_module(self, stages: Sequence['LAStage'], dd: Dd) -> Optional[Tuple[str, nn.Module]]:
        """`(attribute name, module)` of a network-level module with `shared_tensors() -> List[Tensor]`."""
        return None

    def neck(self, feature_chs: List[int], dd: Dd) -> Optional[nn.Module]:
        """Module turning the list of all feature levels into an NCHW map; it has `num_features`."""
        return None

    def prune(self, model: 'ResNetLA') -> None:
        """Drop what the remaining stages no longer use, after `prune_intermediate_layers` removed stages
        (every parameter must receive a gradient under DDP)."""


_BLOCK_EXPANSION = {'bottleneck': 4, 'basic': 1}


@dataclass(frozen=True)
class ResNetLACfg:
    """Architecture of a ResNet on the skeleton.

    Attributes:
        layers: Blocks per stage (3 or 4 stages).
        channels: Bottleneck (inner) width per stage; block output width is `channels * expansion`.
        block: 'bottleneck' or 'basic'.
        expansion: Output width multiplier (default: 4 for bottleneck, 1 for basic).
        stem_type: '' (7x7/2 conv + 3x3/2 max-pool), 'deep' (three 3x3 convs + max-pool, timm
            `resnet50c` layout) or 'cifar' (one 3x3 conv, stride 1, no pooling).
        stem_width: Stem output width ('deep': width of the first two convs; output is twice that).
        zero_init_last: Zero-init the last BN of each residual block.
        out_channels: Block output width per stage, overriding `channels * expansion`.
        residual: 'proj' (identity, or 1x1 conv + BN projection where the shape changes; timm/torchvision),
            'pad' (option A: parameter-free subsample + zero channel padding) or 'none' (no residual).
        last_norm: 'bn' or 'ln' (LayerNorm over channels in place of each block's last BN).
        last_act: Activation after each block's last norm.
        stem_feat: Feature level 0: 'act' (stem activation, before the max-pool) or 'pool' (after it).
        strategy: The family's layer-interaction strategy, `None` for a plain ResNet.
        name: The registered variant, named by error messages (the class name when empty).
    """
    layers: Tuple[int, ...]
    channels: Tuple[int, ...] = (64, 128, 256, 512)
    block: str = 'bottleneck'
    expansion: Optional[int] = None
    stem_type: str = ''
    stem_width: int = 64
    zero_init_last: bool = True
    out_channels: Optional[Tuple[int, ...]] = None
    residual: str = 'proj'
    last_norm: str = 'bn'
    last_act: bool = True
    stem_feat: str = 'act'
    strategy: Optional[LayerStrategy] = None
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
        check_choice(owner, 'block', self.block, tuple(_BLOCK_EXPANSION))
        if self.expansion is not None:
            check_int(owner, 'expansion', self.expansion)
        check_choice(owner, 'stem_type', self.stem_type, ('', 'deep', 'cifar'))
        check_int(owner, 'stem_width', self.stem_width)
        check_choice(owner, 'residual', self.residual, ('proj', 'pad', 'none'))
        check_choice(owner, 'last_norm', self.last_norm, ('bn', 'ln'))
        check_choice(owner, 'stem_feat', self.stem_feat, ('act', 'pool'))
        check_bool(owner, 'zero_init_last', self.zero_init_last)
        check_bool(owner, 'last_act', self.last_act)
        if self.strategy is not None and not isinstance(self.strategy, LayerStrategy):
            raise TypeError(f'{owner}: strategy must be a LayerStrategy or None, got {self.strategy!r}')

    @property
    def stem_chs(self) -> int:
        """Stem output width."""
        return self.stem_width * 2 if self.stem_type == 'deep' else self.stem_width

    @property
    def block_expansion(self) -> int:
        return self.expansion or _BLOCK_EXPANSION[self.block]

    def block_widths(self) -> Tuple[int, ...]:
        """Block output width per stage."""
        return self.out_channels or tuple(c * self.block_expansion for c in self.channels)

    def block_inputs(self) -> List[int]:
        """Input width of every block, in network order."""
        inputs, chs = [], self.stem_chs
        for width, depth in zip(self.block_widths(), self.layers):
            for _ in range(depth):
                inputs.append(chs)
                chs = width
        return inputs


# ---------------------------------------------------------------------------------------------------------------
# Blocks and stages
# ---------------------------------------------------------------------------------------------------------------

def _last_norm(kind: str, chs: int, norm_layer: Type[nn.Module], dd: Dd) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """`(bn, ln)` for a block's last norm: BatchNorm (timm names `bn2` / `bn3`) or LayerNorm over channels
    (`ln2` / `ln3`, eps 1e-5 as PyTorch's LayerNorm)."""
    if kind == 'bn':
        return norm_layer(chs, **dd), None
    if kind == 'ln':
        return None, LayerNorm2d(chs, eps=1e-5, **dd)
    raise ValueError(f"last_norm must be 'bn' or 'ln', got {kind!r}")


class _BlockBase(nn.Module):
    """What both block types share: optional entry module, residual with drop path, optional attention."""

    def _init_tail(
            self,
            downsample: Optional[nn.Module],
            residual: bool,
            drop_path: float,
            layer_attn: Optional[nn.Module],
            entry: Optional[nn.Module],
    ) -> None:
        self.downsample = downsample
        self.residual = residual
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0. else None
        self.attn = layer_attn
        self.attn_in = entry

    @torch.jit.unused
    def _lean_tail(
            self,
            pre: torch.Tensor,
            norm: Optional[nn.Module],
            act: nn.Module,
            shortcut: torch.Tensor,
            state: State,
    ) -> Optional[Tuple[torch.Tensor, State]]:
        """Hand the block's tail (`norm`, residual add, ReLU `act`) and its attention to the attention module's
        memory-lean training path (`forward_tail`), where it applies; None otherwise."""
        attn = self.attn
        if not (self.residual and attn is not None and hasattr(attn, 'forward_tail') and type(norm) is nn.BatchNorm2d
                and type(act) is nn.ReLU and attn.tail_usable(pre, shortcut, state)):
            return None
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        keep = drop_path_keep(self.drop_path, pre)
        return attn.forward_tail(pre, norm, shortcut, keep, state)

    def _add_residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.downsample is not None:  # projected last, as timm: its output is not held through the convs
            shortcut = self.downsample(shortcut)
        if self.residual:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x += shortcut  # in place, as timm: no new full-size buffer
        return x, shortcut


class LABottleneck(_BlockBase):
    """ResNet v1.5 bottleneck with an optional entry module before the convs and attention on the output.

    Other families use it without the residual (`residual=False`) and with a LayerNorm over channels in
    place of the last BN (`last_norm='ln'`, module `ln3`).
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
            entry: Optional[nn.Module] = None,
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
        self._init_tail(downsample, residual, drop_path, layer_attn, entry)

    def zero_init_last(self) -> None:
        # Only a residual branch may start at zero; without the residual the block's output would be zero.
        if self.residual and self.bn3 is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        if self.attn_in is not None:
            x, state = self.attn_in(x, state, shared)
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.conv3(x)
        if not torch.jit.is_scripting():
            lean = self._lean_tail(x, self.bn3, self.act3, shortcut, state)
            if lean is not None:
                return lean
        if self.bn3 is not None:
            x = self.bn3(x)
        if self.ln3 is not None:
            x = self.ln3(x)
        x, shortcut = self._add_residual(x, shortcut)
        x = self.act3(x)
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


class LABasicBlock(_BlockBase):
    """ResNet basic block (two 3x3 convs) with an optional entry module and attention on its output.

    `residual=False` gives a plain block; an option-A `PadShortcut` as `downsample` the CIFAR ResNet of
    He et al.
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
            entry: Optional[nn.Module] = None,
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
        self._init_tail(downsample, residual, drop_path, layer_attn, entry)

    def zero_init_last(self) -> None:
        if self.residual and self.bn2 is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        if self.attn_in is not None:
            x, state = self.attn_in(x, state, shared)
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.conv2(x)
        if not torch.jit.is_scripting():
            lean = self._lean_tail(x, self.bn2, self.act2, shortcut, state)
            if lean is not None:
                return lean
        if self.bn2 is not None:
            x = self.bn2(x)
        if self.ln2 is not None:
            x = self.ln2(x)
        x, shortcut = self._add_residual(x, shortcut)
        x = self.act2(x)
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


_BLOCKS: Dict[str, Type[_BlockBase]] = {'bottleneck': LABottleneck, 'basic': LABasicBlock}


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


def _checkpoint_unit(unit: nn.Module, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
    """Activation-checkpoint one unit, passing the carried state and shared tensors as tensor arguments."""
    num_state = len(state)

    def run(x: torch.Tensor, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x, new_state = unit(x, list(tensors[:num_state]), list(tensors[num_state:]))
        return (x, *new_state)
    out = checkpoint(run, x, *state, *shared, use_reentrant=False)
    return out[0], list(out[1:])


class LAStage(nn.Sequential):
    """A stage: its units run in order, each receiving and returning the carried attention state.

    The units are the blocks (`0`, `1`, ...), optionally preceded by an entry unit `attn_in` and followed by
    an exit unit `attn`; all follow the contract `(x, state, shared) -> (x, state)`, so they are
    checkpointed, pruned and scripted alike. As in any `nn.Sequential`, integer indexing counts every unit:
    address blocks by name (`stage.get_submodule('0')`, state-dict keys `layerS.i.*`) when a stage has an
    entry unit.
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
        self.is_stage = True  # what the network's stage loop looks for (`hasattr` is static under TorchScript)

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        for unit in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, state = _checkpoint_unit(unit, x, state, shared)
            else:
                x, state = unit(x, state, shared)
        return x, state

    def blocks(self) -> List[nn.Module]:
        """The stage's blocks, without its entry / exit units."""
        return [m for name, m in self.named_children() if name.isdigit()]


def _make_downsample(kind: str, in_chs: int, out_chs: int, stride: int, norm_layer: Type[nn.Module],
                     dd: Dd) -> Optional[nn.Module]:
    """The residual path of a stage's first block where the shape changes (`None`: identity or no residual)."""
    if kind == 'none' or (stride == 1 and in_chs == out_chs):
        return None
    if kind == 'pad':
        return PadShortcut(in_chs, out_chs, stride)
    if kind == 'proj':
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd), norm_layer(out_chs, **dd))
    raise ValueError(f"residual must be 'proj', 'pad' or 'none', got {kind!r}")


def make_stages(
        cfg: ResNetLACfg,
        output_stride: int = 32,
        drop_path_rate: float = 0.,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        dd: Optional[Dd] = None,
) -> Tuple[List[LAStage], List[Dict[str, Any]]]:
    """Build the stages of `cfg` with its strategy's modules in place, and their `feature_info` entries.

    `drop_path_rate` goes to the strategy's branch when it has one (constant over depth, as in the official
    layer-attention models), else to the trunk residuals, rising linearly over the blocks (timm's rule).
    """
    dd = dd or {}
    strategy = cfg.strategy or LayerStrategy()
    branch_drop = strategy.branch_drop_path() is not None
    expansion = cfg.block_expansion
    block_cls = _BLOCKS[cfg.block]
    cifar_stem = cfg.stem_type == 'cifar'
    net_stride = 1 if cifar_stem else 4
    dilation = prev_dilation = 1
    in_chs, prev_chs = cfg.stem_chs, None
    num_blocks, block_id = sum(cfg.layers), 0
    prev_block: Optional[BlockSite] = None
    prev_stage: Optional[StageSite] = None
    stages, feature_info = [], []
    for stage_idx, (planes, depth) in enumerate(zip(cfg.channels, cfg.layers)):
        stride = 1 if stage_idx == 0 else 2
        if net_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            net_stride *= stride
        out_chs = cfg.out_channels[stage_idx] if cfg.out_channels else planes * expansion
        stage_site = StageSite(stage_idx, in_chs, out_chs, stride, prev_stage)
        pre = strategy.stage_entry(stage_site, dd)
        downsample = _make_downsample(cfg.residual, in_chs, out_chs, stride, norm_layer, dd)
        blocks = []
        for block_idx in range(depth):
            site = BlockSite(stage_idx, block_idx, block_id, num_blocks, in_chs, out_chs, prev_chs,
                             stride if block_idx == 0 else 1, prev_block)
            trunk_drop = 0. if branch_drop else drop_path_rate * block_id / max(num_blocks - 1, 1)
            blocks.append(block_cls(
                in_chs, planes, site.stride,
                downsample=downsample if block_idx == 0 else None,
                dilation=dilation,
                first_dilation=prev_dilation,
                expansion=expansion,
                out_chs=out_chs,
                layer_attn=strategy.block_attn(site, drop_path_rate, norm_layer, dd),
                entry=strategy.block_entry(site, dd),
                residual=cfg.residual != 'none',
                last_norm=cfg.last_norm,
                last_act=cfg.last_act,
                drop_path=trunk_drop,
                norm_layer=norm_layer,
                **dd,
            ))
            prev_dilation = dilation
            in_chs = prev_chs = out_chs
            prev_block = site
            block_id += 1
        stages.append(LAStage(*blocks, pre=pre, post=strategy.stage_exit(stage_site, dd)))
        feature_info.append(dict(num_chs=out_chs, reduction=net_stride, module=f'layer{stage_idx + 1}'))
        prev_stage = stage_site
    return stages, feature_info


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------

class ResNetLA(nn.Module):
    """ResNet skeleton with a pluggable layer-interaction strategy (`ResNetLACfg.strategy`)."""

    def __init__(
            self,
            cfg: ResNetLACfg,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: int = 32,
            drop_rate: float = 0.,
            drop_path_rate: Optional[float] = None,
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
            drop_path_rate: For a strategy with its own branch (KCLA, MRLA): drop-path rate of that branch,
                constant over depth as in the official models (the trunk residual is never dropped); `None`:
                the strategy's default. Otherwise: stochastic depth of the residual branches, rising linearly
                to this rate over the blocks (timm's rule); an error for nets without residuals.
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
        strategy = cfg.strategy or LayerStrategy()
        strategy.check(cfg, name)
        branch_drop = strategy.branch_drop_path()
        if drop_path_rate is None:
            drop_path_rate = branch_drop if branch_drop is not None else 0.
        if drop_path_rate and branch_drop is None and cfg.residual == 'none':
            raise ValueError(
                f'{name}: drop_path_rate must be 0 for this model (it has no residual branch to drop), '
                f'got {drop_path_rate!r}')
        self.cfg = cfg
        self._name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        norm_layer = nn.BatchNorm2d

        # Stem
        cifar_stem = cfg.stem_type == 'cifar'
        stem_chs = cfg.stem_chs
        if cfg.stem_type == 'deep':
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_chans, cfg.stem_width, 3, stride=2, padding=1, bias=False, **dd),
                norm_layer(cfg.stem_width, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(cfg.stem_width, cfg.stem_width, 3, padding=1, bias=False, **dd),
                norm_layer(cfg.stem_width, **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(cfg.stem_width, stem_chs, 3, padding=1, bias=False, **dd),
            )
        elif cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, padding=1, bias=False, **dd)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = norm_layer(stem_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem_pooled = cfg.stem_feat == 'pool'
        stem_reduction = (1 if cifar_stem else 2) * (2 if self.stem_pooled and not cifar_stem else 1)
        self.feature_info = [dict(
            num_chs=stem_chs, reduction=stem_reduction, module='maxpool' if self.stem_pooled else 'act1')]

        # Stages
        stages, stage_info = make_stages(cfg, output_stride, drop_path_rate, norm_layer, dd)
        self.stage_names: Tuple[str, ...] = tuple(info['module'] for info in stage_info)
        for name_, stage in zip(self.stage_names, stages):
            self.add_module(name_, stage)
        self.feature_info += stage_info

        # Network-level module: its tensors are handed to every unit (see `_shared_tensors`).
        network = strategy.network_module(stages, dd)
        if network is not None:
            self.add_module(*network)

        # Neck (reads every feature level) and head
        self.num_features = stage_info[-1]['num_chs']
        self.neck: Optional[nn.Module] = strategy.neck([f['num_chs'] for f in self.feature_info], dd)
        if self.neck is not None:
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
                if isinstance(m, _BlockBase):
                    m.zero_init_last()

    @torch.jit.ignore
    def stages(self) -> List[LAStage]:
        return [getattr(self, n) for n in self.stage_names]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # A block's modules live inside the block, so `layerS.i` covers them. A stage's entry unit gets its own
        # group before the stage's first block, its exit unit joins the stage's last block; a network-level
        # module joins the stem (the first unit already uses it).
        blocks = r'^layer(\d+)' if coarse else [
            (r'^layer(\d+)\.attn_in\.', (-1,)),
            (r'^layer(\d+)\.(\d+)', None),
            (r'^layer(\d+)\.attn\.', (99999,)),  # timm's MATCH_PREV_GROUP
        ]
        stem = ['conv1', 'bn1', 'maxpool'] + [n for n, m in self.named_children() if hasattr(m, 'shared_tensors')]
        return dict(stem=r'^' + '|'.join(stem), blocks=blocks)

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

    def _shared_tensors(self) -> Shared:
        """The network-level module's tensors (empty without one). A loop over the children with a static
        `hasattr` keeps this generic and scriptable."""
        shared: Shared = []
        for m in self.children():
            if hasattr(m, 'shared_tensors'):
                shared = m.shared_tensors()
        return shared

    def _forward_levels(self, x: torch.Tensor, num_stages: int, keep: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Stem and the first `num_stages` stages; the feature levels are returned when `keep` (else only the
        final map, so that each level is freed as early as possible)."""
        self._check_input(x)
        x = self.forward_stem(x)
        feats: List[torch.Tensor] = []
        if keep and not self.stem_pooled:
            feats.append(x)
        x = self.maxpool(x)
        if keep and self.stem_pooled:
            feats.append(x)
        state: State = []
        shared = self._shared_tensors()
        i = 0
        for stage in self.children():  # registration order; scriptable, unlike a list of modules
            if hasattr(stage, 'is_stage'):
                if i < num_stages:
                    x, state = stage(x, state, shared)
                    if keep:
                        feats.append(x)
                i += 1
        return x, feats

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
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        num_stages = max_index if stop_early else len(self.stage_names)
        x, feats = self._forward_levels(x, num_stages, keep=True)
        intermediates = [feats[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        if self.neck is not None and num_stages == len(self.stage_names):
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
        if self.cfg.strategy is not None:
            self.cfg.strategy.prune(self)
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
        # Only a neck reads every level; otherwise each is freed as soon as the next stage has run.
        x, feats = self._forward_levels(x, len(self.stage_names), keep=self.neck is not None)
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
