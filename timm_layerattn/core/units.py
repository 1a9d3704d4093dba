"""The unit contract and the unit runner: what every trunk with layer attention is made of.

A *unit* is any module with the signature `(x, state, shared) -> (x, state)`: a block, a stage's entry or
exit module. `state` is the carried layer-attention state, a list of tensors whose meaning belongs to the
strategy (a history summary, a key / value cache, ...); the trunk only threads it from unit to unit.
`shared` are tensors owned once by the network and handed to every unit at call time (the shared
projections of attention shortcuts).

`LAStage` runs its units in order with optional activation checkpointing that passes the carried state
through as tensor arguments, so grad checkpointing, pruning and scripting treat every unit alike whatever
the trunk (ResNet stages today, transformer block groups tomorrow).
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ['State', 'Shared', 'Dd', 'LAStage', 'checkpoint_unit']

State = List[torch.Tensor]
Shared = List[torch.Tensor]
Dd = Dict[str, Any]  # the `device` / `dtype` factory kwargs


def checkpoint_unit(unit: nn.Module, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
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
    an exit unit `attn`; all follow the unit contract, so they are checkpointed, pruned and scripted alike.
    As in any `nn.Sequential`, integer indexing counts every unit: address blocks by name
    (`stage.get_submodule('0')`, state-dict keys `layerS.i.*`) when a stage has an entry unit.
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
        self.is_stage = True  # what a trunk's stage loop looks for (`hasattr` is static under TorchScript)

    def forward(self, x: torch.Tensor, state: State, shared: Shared) -> Tuple[torch.Tensor, State]:
        for unit in self:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, state = checkpoint_unit(unit, x, state, shared)
            else:
                x, state = unit(x, state, shared)
        return x, state

    def blocks(self) -> List[nn.Module]:
        """The stage's blocks, without its entry / exit units."""
        return [m for name, m in self.named_children() if name.isdigit()]
