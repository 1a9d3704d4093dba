"""The ResNet trunk's parts: block types and stems, each in a registry as in timm's `byobnet.py`.

A block is a template (`LABlock`) with one tail, the same for every block type:

    entry unit -> conv input (widened from the state) -> conv stack -> last norm -> pre-residual module
    -> residual add (drop path) -> activation -> attention

A block type only builds its conv stack under timm's parameter names (`conv1` / `bn1` / ... ) and says which
of its modules are the last norm and activation and which norm / activation pairs sit between its convs (the
memory-lean training path fuses both); the strategy's modules sit at the named places of the tail (`attn_in`,
`attn_pre`, `attn`). A stem builds `conv1`; the trunk adds `bn1`, `act1` and the max-pool.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, create_act_layer

from ..core.units import Dd, Shared, State
from ..layers import lean
from ..layers.lean import drop_path_keep

__all__ = [
    'LABlock', 'LABottleneck', 'LABasicBlock', 'BLOCKS', 'register_block', 'PadShortcut', 'make_downsample',
    'StemCfg', 'STEMS', 'register_stem',
]


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------

def _last_norm(kind: str, chs: int, norm_layer: Type[nn.Module], dd: Dd) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """`(bn, ln)` for a block's last norm: the trunk's norm layer (timm names `bn2` / `bn3`) or LayerNorm over
    channels (`ln2` / `ln3`, eps 1e-5 as PyTorch's LayerNorm)."""
    if kind == 'bn':
        return norm_layer(chs, **dd), None
    if kind == 'ln':
        return None, LayerNorm2d(chs, eps=1e-5, **dd)
    raise ValueError(f"last_norm must be 'bn' or 'ln', got {kind!r}")


class LABlock(nn.Module):
    """A residual block as a template: subclasses build the conv stack; the tail is this class's.

    Subclasses set `expansion` and implement `forward_convs` (input -> the last conv's output),
    `forward_last_norm`, `forward_last_act` and `last_norm_act` (the modules the memory-lean tail runs), and
    `inner_norm_acts` (the pairs `forward_convs` runs as `lean.NormReLU` where `_lean_convs` allows).
    """
    expansion: int = 1

    def _init_tail(
            self,
            downsample: Optional[nn.Module],
            residual: bool,
            drop_path: float,
            layer_attn: Optional[nn.Module],
            entry: Optional[nn.Module],
            pre_residual: Optional[nn.Module],
    ) -> None:
        self.downsample = downsample
        self.residual = residual
        self.drop_path = DropPath(drop_path) if residual and drop_path > 0. else None
        self.attn = layer_attn
        self.attn_in = entry
        self.attn_pre = pre_residual
        self.attn_cat = None  # the strategy's `block_conv_input`, set by the trunk

    def forward_convs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def inner_norm_acts(self) -> Tuple[Tuple[nn.Module, nn.Module], ...]:
        """The `(norm, act)` pairs after the convs before the last, which the memory-lean path fuses."""
        raise NotImplementedError

    @torch.jit.unused
    def _lean_convs(self, x: torch.Tensor) -> bool:
        """Whether `forward_convs` runs its inner norms and ReLUs as `lean.NormReLU` (training, fused kernels)."""
        return lean.norm_relu_usable(x, self.inner_norm_acts())

    def forward_last_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_last_act(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def last_norm_act(self) -> Tuple[Optional[nn.Module], nn.Module]:
        """The last BatchNorm (`None` for a LayerNorm ending) and the last activation."""
        raise NotImplementedError

    def zero_init_last(self) -> None:
        # Only a residual branch may start at zero; without the residual the block's output would be zero.
        norm = self.last_norm_act()[0]
        if self.residual and norm is not None:
            nn.init.zeros_(norm.weight)

    @torch.jit.unused
    def _lean_tail(self, pre: torch.Tensor, shortcut: torch.Tensor, state: State) -> Optional[Tuple[torch.Tensor, State]]:
        """Hand the block's tail (last BatchNorm, residual add, ReLU) to the one module around it that has a fused
        path for it (`forward_tail`): the attention after the tail (its memory-lean training path) or a gate before
        the residual add (inference and training); None where neither applies."""
        if not self.residual or (self.attn_pre is not None and self.attn is not None):
            return None
        owner = self.attn if self.attn_pre is None else self.attn_pre
        if owner is None or not hasattr(owner, 'forward_tail'):
            return None
        norm, act = self.last_norm_act()
        if not (type(norm) is nn.BatchNorm2d and type(act) is nn.ReLU and owner.tail_usable(pre, shortcut, state)):
            return None
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        keep = drop_path_keep(self.drop_path, pre)
        return owner.forward_tail(pre, norm, shortcut, keep, state)

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        if self.attn_in is not None:
            x, state = self.attn_in(x, state, shared)
        shortcut = x
        if self.attn_cat is not None:
            x = self.attn_cat(x, state)
        x = self.forward_convs(x)
        if not torch.jit.is_scripting():
            lean = self._lean_tail(x, shortcut, state)
            if lean is not None:
                return lean
        x = self.forward_last_norm(x)
        if self.attn_pre is not None:
            x, state = self.attn_pre(x, state)
        if self.downsample is not None:  # projected last, as timm: its output is not held through the convs
            shortcut = self.downsample(shortcut)
        if self.residual:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x += shortcut  # in place, as timm: no new full-size buffer
        x = self.forward_last_act(x)
        if self.attn is not None:
            x, state = self.attn(x, shortcut, state)
        return x, state


BLOCKS: Dict[str, Type[LABlock]] = {}


def register_block(name: str) -> Callable[[Type[LABlock]], Type[LABlock]]:
    """Class decorator: make a block type available to `ResNetLACfg(block=name)`."""
    def add(cls: Type[LABlock]) -> Type[LABlock]:
        BLOCKS[name] = cls
        return cls
    return add


@register_block('bottleneck')
class LABottleneck(LABlock):
    """ResNet v1.5 bottleneck (1x1, 3x3 with the stride, 1x1).

    Other families use it without the residual (`residual=False`) and with a LayerNorm over channels in
    place of the last BN (`last_norm='ln'`, module `ln3`).
    """
    expansion = 4

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
            pre_residual: Optional[nn.Module] = None,
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
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation, bias=False, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False, **dd)
        self.bn3, self.ln3 = _last_norm(last_norm, out_chs, norm_layer, dd)
        self.act3 = create_act_layer(act_layer, inplace=True) if last_act else nn.Identity()
        self._init_tail(downsample, residual, drop_path, layer_attn, entry, pre_residual)

    def forward_convs(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._lean_convs(x):
                x = lean.norm_relu(self.conv1(x), self.bn1)
                return self.conv3(lean.norm_relu(self.conv2(x), self.bn2))
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.conv3(x)

    @torch.jit.unused
    def inner_norm_acts(self) -> Tuple[Tuple[nn.Module, nn.Module], ...]:
        return (self.bn1, self.act1), (self.bn2, self.act2)

    def forward_last_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn3 is not None:
            x = self.bn3(x)
        if self.ln3 is not None:
            x = self.ln3(x)
        return x

    def forward_last_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(x)

    @torch.jit.unused
    def last_norm_act(self) -> Tuple[Optional[nn.Module], nn.Module]:
        return self.bn3, self.act3


@register_block('basic')
class LABasicBlock(LABlock):
    """ResNet basic block (two 3x3 convs, the stride on the first).

    `residual=False` gives a plain block; an option-A `PadShortcut` as `downsample` the CIFAR ResNet of
    He et al.
    """
    expansion = 1

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
            pre_residual: Optional[nn.Module] = None,
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
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=dilation, dilation=dilation, bias=False, **dd)
        self.bn2, self.ln2 = _last_norm(last_norm, out_chs, norm_layer, dd)
        self.act2 = create_act_layer(act_layer, inplace=True) if last_act else nn.Identity()
        self._init_tail(downsample, residual, drop_path, layer_attn, entry, pre_residual)

    def forward_convs(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._lean_convs(x):
                return self.conv2(lean.norm_relu(self.conv1(x), self.bn1))
        return self.conv2(self.act1(self.bn1(self.conv1(x))))

    @torch.jit.unused
    def inner_norm_acts(self) -> Tuple[Tuple[nn.Module, nn.Module], ...]:
        return ((self.bn1, self.act1),)

    def forward_last_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn2 is not None:
            x = self.bn2(x)
        if self.ln2 is not None:
            x = self.ln2(x)
        return x

    def forward_last_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(x)

    @torch.jit.unused
    def last_norm_act(self) -> Tuple[Optional[nn.Module], nn.Module]:
        return self.bn2, self.act2


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


def make_downsample(kind: str, in_chs: int, out_chs: int, stride: int, norm_layer: Type[nn.Module],
                    dd: Dd) -> Optional[nn.Module]:
    """The residual path of a stage's first block where the shape changes (`None`: identity or no residual)."""
    if kind == 'none' or (stride == 1 and in_chs == out_chs):
        return None
    if kind == 'pad':
        return PadShortcut(in_chs, out_chs, stride)
    if kind == 'proj':
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd), norm_layer(out_chs, **dd))
    raise ValueError(f"residual must be 'proj', 'pad' or 'none', got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# Stems
# ---------------------------------------------------------------------------------------------------------------

StemConvFn = Callable[[int, int, Type[nn.Module], Type[nn.Module], Dd], nn.Module]


@dataclass(frozen=True)
class StemCfg:
    """A stem: how `conv1` is built, its stride, whether a 3x3/2 max-pool follows `bn1` / `act1`, and the
    output width as a multiple of `stem_width`.

    `conv(in_chans, stem_width, norm_layer, act_layer, dd)` returns `conv1`.
    """
    conv: StemConvFn
    stride: int
    pool: bool
    width_mult: int = 1


def _conv_stem(kernel: int, stride: int) -> StemConvFn:
    def conv(in_chans: int, width: int, norm_layer: Type[nn.Module], act_layer: Type[nn.Module], dd: Dd) -> nn.Module:
        return nn.Conv2d(in_chans, width, kernel, stride=stride, padding=kernel // 2, bias=False, **dd)
    return conv


def _deep_stem(in_chans: int, width: int, norm_layer: Type[nn.Module], act_layer: Type[nn.Module], dd: Dd) -> nn.Module:
    # timm's `resnet50c` / `resnet50d` layout: three 3x3 convs, the first strided, output twice the width.
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False, **dd),
        norm_layer(width, **dd),
        create_act_layer(act_layer, inplace=True),
        nn.Conv2d(width, width, 3, padding=1, bias=False, **dd),
        norm_layer(width, **dd),
        create_act_layer(act_layer, inplace=True),
        nn.Conv2d(width, width * 2, 3, padding=1, bias=False, **dd),
    )


STEMS: Dict[str, StemCfg] = {}


def register_stem(name: str, stem: StemCfg) -> None:
    """Make a stem available to `ResNetLACfg(stem_type=name)`."""
    STEMS[name] = stem


register_stem('', StemCfg(_conv_stem(7, 2), stride=2, pool=True))  # 7x7/2 conv + 3x3/2 max-pool (ImageNet)
register_stem('deep', StemCfg(_deep_stem, stride=2, pool=True, width_mult=2))
register_stem('cifar', StemCfg(_conv_stem(3, 1), stride=1, pool=False))  # one 3x3 conv, full resolution
register_stem('conv7_s1', StemCfg(_conv_stem(7, 1), stride=1, pool=False))  # KCLA's segmentation encoder
