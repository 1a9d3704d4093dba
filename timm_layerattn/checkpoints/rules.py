"""The checkpoint-rules interface: one object per family says how that family's checkpoints are read.

A `Family` (the registry in `timm_layerattn.families`) carries its `CheckpointRules`; every entry point that
reads weights asks the rules of the target model's family instead of branching on the family's name:

* `timm.create_model(..., pretrained=True)` and the detection backbone call `filter(state_dict, model)` (timm's
  `checkpoint_filter_fn`), which renames an official layout with `remap`;
* `convert_official` asks every registered family's `official_type` which official code wrote a file
  (`official_layout`), then the target family's `check_source` for its own refusals (a head dim that does not
  fit, an unsupported official variant), `remap` for the renamed tensors and the report of what was dropped,
  and `validate` for values the family fixes;
* the checkpoint matcher asks `native_kind` what a state dict in this package's layout holds, and `hints`
  what to tell a user whose checkpoint does not fit;
* the Hub exporter's model builder asks `model_kwargs` which kwargs a checkpoint needs (a KCLA head dim).

So `filter` and `convert_official` rename and drop through the same `remap`: one file gives the same tensors
either way. The base class is the rule set of a family without an official layout: checkpoints pass through
unwrapped.
"""
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..families import families
from .io import unwrap_checkpoint

__all__ = [
    'CheckpointRules', 'KindRules', 'Remapped', 'UnsupportedLayout', 'UNSUPPORTED_LAYOUTS', 'unsupported_layout',
    'registered_rules', 'official_layout', 'convertible_modules', 'rename_key',
]


def rename_key(key: Any, rules: Sequence[Tuple[str, str]]) -> Any:
    """`key` with each `(pattern, replacement)` regular-expression rule applied in order; a key that is not a
    string is returned as it is."""
    if isinstance(key, str):
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
    return key


@dataclass
class Remapped:
    """The result of `CheckpointRules.remap`: renamed tensors, where each came from, what was dropped."""
    state_dict: Dict[str, Any]
    source_names: Dict[str, str] = field(default_factory=dict)  # new key -> official key
    dropped: List[str] = field(default_factory=list)  # official keys of modules that never run


class CheckpointRules:
    """How one family's checkpoints are detected, renamed and checked. Subclasses override what applies.

    Attributes:
        converts: True when `convert_official` detects and converts the family's official layout. False for a
            family without one, and for one whose official files load through the model's `filter` only.
    """
    converts: bool = False

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        """The family name when `state_dict` is in the family's official (research code) layout, else None."""
        return None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        """What a state dict in this package's layout holds, told from its keys (e.g. 'kcla'); None if not
        this family's."""
        return None

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """Refuse a checkpoint (official layout or this package's) that the architecture `arch` (config `cfg`)
        cannot take, with one line that says what to do; return what the conversion report should state (fields
        of `convert.ConversionReport`, e.g. an inferred `head_dim`)."""
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        """Official names -> this package's, given the target model's state dict `expected` (the one place
        that decides which official modules never run and are dropped)."""
        return Remapped(dict(state_dict))

    def validate(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any],
                 source_names: Mapping[str, str]) -> None:
        """Refuse converted tensors whose values the family fixes and the checkpoint contradicts (one line
        naming the checkpoint's key, `source_names` maps converted keys back to it)."""

    def model_kwargs(self, state_dict: Mapping[str, Any], cfg: Any) -> Tuple[Dict[str, Any], str]:
        """The model kwargs a checkpoint of this family needs beyond its architecture `cfg` (e.g. a KCLA head
        dim read from `norm_d` that is not the architecture's), and a note saying so; `({}, '')` if none."""
        return {}, ''

    def hints(self, state_dict: Mapping[str, Any], cfg: Any, *, mismatched: Sequence[str] = (),
              backbone: bool = False) -> List[str]:
        """What to tell a user whose checkpoint of this family does not fit a model built from `cfg`.

        Args:
            state_dict: The checkpoint, in this package's layout.
            cfg: The model's architecture config (`model.cfg`), if any.
            mismatched: The keys whose shapes differ from the model's, where known.
            backbone: Word the hints for the MMDetection backbone's config rather than `timm.create_model`.
        """
        return []

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        """timm's `checkpoint_filter_fn`: unwrap training containers and prefixes, then rename an official
        layout (a checkpoint already in this package's layout passes through unchanged)."""
        state_dict, _ = unwrap_checkpoint(state_dict)
        if self.official_type(state_dict) is None:
            return state_dict
        return self.remap(state_dict, model.state_dict()).state_dict


class KindRules(CheckpointRules):
    """The rules of one of several families whose layouts one module's detectors tell apart: `detect_official`
    (an official state dict -> its kind or None) and `detect_native` (this package's key names -> its kind or
    None), set as static methods by the subclass. Each object claims only what names its own `kind`."""
    detect_official: Any = None
    detect_native: Any = None

    def __init__(self, kind: str):
        self.kind = kind

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return self.kind if self.detect_official(state_dict) == self.kind else None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return self.kind if self.detect_native(keys) == self.kind else None


@dataclass(frozen=True)
class UnsupportedLayout:
    """An official layout this package recognises only to refuse it (a family it does not have)."""
    name: str
    marker: str  # a substring of the layout's keys that no supported layout has
    message: str


# Known official layouts of families this package does not implement.
UNSUPPORTED_LAYOUTS: Tuple[UnsupportedLayout, ...] = ()


def unsupported_layout(state_dict: Mapping[str, Any]) -> Optional[UnsupportedLayout]:
    """The `UnsupportedLayout` whose marker a key of `state_dict` holds, None if none."""
    keys = [k for k in state_dict if isinstance(k, str)]
    return next((layout for layout in UNSUPPORTED_LAYOUTS if any(layout.marker in k for k in keys)), None)


def registered_rules() -> List[CheckpointRules]:
    """The rules of every registered family (each object once), in registration order.

    Read at call time: the registry is filled when `timm_layerattn.models` is imported.
    """
    out: Dict[int, CheckpointRules] = {}
    for family in families():
        rules = getattr(family, 'rules', None)
        if rules is not None:
            out.setdefault(id(rules), rules)
    return list(out.values())


def official_layout(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which official code wrote `state_dict`, of the layouts `convert_official` converts (`converts`): the
    family's name ('kcla', 'mrla_light', 'mrla_base', 'cnntention'), or None (this package's layout, which is
    also timm's / torchvision's)."""
    for rules in registered_rules():
        if rules.converts:
            found = rules.official_type(state_dict)
            if found is not None:
                return found
    return None


def convertible_modules() -> Tuple[Any, ...]:
    """The rules modules (each once, in registration order) whose official layouts `convert_official` converts."""
    return tuple(dict.fromkeys(sys.modules[type(rules).__module__] for rules in registered_rules()
                               if rules.converts))
