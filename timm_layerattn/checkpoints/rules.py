"""The checkpoint-rules interface: one object per family says how that family's checkpoints are read.

A `Family` (the registry in `timm_layerattn.families`) carries its `CheckpointRules`; every entry point that
reads weights asks the rules of the target model's family instead of branching on the family's name:

* `timm.create_model(..., pretrained=True)` and the detection backbone call `filter(state_dict, model)` (timm's
  `checkpoint_filter_fn`);
* `convert_official` calls `official_type` to tell which official code wrote a file, `check_source` for the
  family's own refusals (a head dim that does not fit, an unsupported official variant), then `remap` for the
  renamed tensors and the report of what was dropped;
* the checkpoint matcher asks `native_kind` what a state dict in this package's layout holds.

The base class is the rule set of a family without an official layout: checkpoints pass through unwrapped.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .io import unwrap_checkpoint

__all__ = ['CheckpointRules', 'Remapped']


@dataclass
class Remapped:
    """The result of `CheckpointRules.remap`: renamed tensors, where each came from, what was dropped."""
    state_dict: Dict[str, Any]
    source_names: Dict[str, str] = field(default_factory=dict)  # new key -> official key
    dropped: List[str] = field(default_factory=list)  # official keys of modules that never run


class CheckpointRules:
    """How one family's checkpoints are detected, renamed and checked. Subclasses override what applies."""

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        """The family name when `state_dict` is in the family's official (research code) layout, else None."""
        return None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        """What a state dict in this package's layout holds, told from its keys (e.g. 'kcla'); None if not
        this family's."""
        return None

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """Refuse an official checkpoint that the architecture `arch` (config `cfg`) cannot take, with one line
        that says what to do; return what the conversion report should state (e.g. an inferred head dim)."""
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        """Official names -> this package's, given the target model's state dict `expected` (the one place
        that decides which official modules never run and are dropped)."""
        return Remapped(dict(state_dict))

    def hints(self, state_dict: Mapping[str, Any], cfg: Any) -> List[str]:
        """What to tell a user whose checkpoint of this family does not fit a model built from `cfg`."""
        return []

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        """timm's `checkpoint_filter_fn`: unwrap training containers and prefixes, then rename an official
        layout (a checkpoint already in this package's layout passes through unchanged)."""
        state_dict, _ = unwrap_checkpoint(state_dict)
        if self.official_type(state_dict) is None:
            return state_dict
        return self.remap(state_dict, model.state_dict()).state_dict
