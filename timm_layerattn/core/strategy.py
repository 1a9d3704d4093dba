"""The strategy interface: what a family plugs into a trunk, and where.

A family is data plus a `LayerStrategy`. The trunk (the ResNet in `models.resnet_trunk` today) calls the
strategy's hooks while it builds itself, once per *site*, and places the returned modules; every hook is
optional and the defaults add nothing. The hooks see the trunk only through the small protocols below
(`TrunkCfg`, `Trunk`), so one strategy can serve any trunk that offers them.

Modules follow the unit contract of `core.units` (`(x, state, shared) -> (x, state)`) or, for the modules
inside a block, the block-tail contracts:

* `block_entry`: in front of a block's convs, a unit `(x, state, shared) -> (x, state)`;
* `block_conv_input`: widens the input of a block's convs from the state, `(x, state) -> conv input`, with
  `extra_chs` more channels than `x` (the residual keeps `x`);
* `block_pre_residual`: after the block's last norm, before the residual add, `(x, state) -> (x, state)`
  (SE / ECA-style gates);
* `block_attn`: on the block's output, `(x, shortcut, state) -> (x, state)` (KCLA, MRLA);
* `stage_entry` / `stage_exit`: units before a stage's first / after its last block;
* `network_module`: a module whose `shared_tensors()` are handed to every unit at call time;
* `neck`: a module turning the list of all feature levels, followed by the final carried state, into
  `forward_features`'s output.
"""
from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple, Type

import torch.nn as nn

from .units import Dd, LAStage

__all__ = ['BlockSite', 'StageSite', 'TrunkCfg', 'Trunk', 'LayerStrategy']


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


class TrunkCfg(Protocol):
    """What a strategy may read of an architecture config to check that it can run on it."""
    name: str

    def block_widths(self) -> Tuple[int, ...]:
        """Block output width per stage."""

    def block_inputs(self) -> List[int]:
        """Input width of every block, in network order."""


class Trunk(Protocol):
    """What a strategy may ask of a built network (pruning, init)."""

    def stages(self) -> List[LAStage]:
        """The stages that remain, in order."""


class LayerStrategy:
    """What a family plugs into a trunk. Every hook is optional; the defaults add nothing.

    Concrete strategies are frozen dataclasses (they are part of a frozen architecture config). Hooks receive
    `dd`, the `device` / `dtype` factory kwargs, and return modules following the contracts in the module
    docstring, or `None`.
    """

    def check(self, cfg: TrunkCfg, owner: str) -> None:
        """Reject an architecture the strategy cannot run on (`owner` names the model in the message)."""

    def branch_drop_path(self) -> Optional[float]:
        """Default drop-path rate of the strategy's own branch, or `None` when the strategy has no branch of
        its own: then `drop_path_rate` is stochastic depth of the trunk's residual branches."""
        return None

    def block_attn(self, site: BlockSite, drop_path: float, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        """Attention on a block's output, `(x, shortcut, state) -> (x, state)`."""
        return None

    def block_pre_residual(self, site: BlockSite, norm_layer: Type[nn.Module], dd: Dd) -> Optional[nn.Module]:
        """Module between a block's last norm and its residual add, `(x, state) -> (x, state)`."""
        return None

    def block_entry(self, site: BlockSite, dd: Dd) -> Optional[nn.Module]:
        """Unit in front of a block's convs, `(x, state, shared) -> (x, state)`."""
        return None

    def block_conv_input(self, site: BlockSite, dd: Dd) -> Optional[nn.Module]:
        """Module widening a block's conv input from the carried state, `(x, state) -> conv input`, with an
        `extra_chs` attribute: the block's first conv takes `in_chs + extra_chs` channels; the residual keeps `x`."""
        return None

    def stage_entry(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        """Unit before a stage's first block, `(x, state, shared) -> (x, state)`."""
        return None

    def stage_exit(self, site: StageSite, dd: Dd) -> Optional[nn.Module]:
        """Unit after a stage's last block, `(x, state, shared) -> (x, state)`."""
        return None

    def network_module(self, stages: Sequence[LAStage], dd: Dd) -> Optional[Tuple[str, nn.Module]]:
        """`(attribute name, module)` of a network-level module with `shared_tensors() -> List[Tensor]`."""
        return None

    def neck(self, feature_chs: List[int], dd: Dd) -> Optional[nn.Module]:
        """Module turning the list of all feature levels followed by the final carried state (`levels + state`)
        into an NCHW map; it has `num_features`."""
        return None

    def init_weights(self, model: Trunk) -> None:
        """Initialise the strategy's own modules after the trunk's init (which covers every conv and norm)."""

    def prune(self, model: Trunk) -> None:
        """Drop what the remaining stages no longer use, after `prune_intermediate_layers` removed stages (and
        the neck and head where it drops them; every parameter must receive a gradient under DDP)."""
