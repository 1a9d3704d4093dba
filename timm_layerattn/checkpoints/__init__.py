"""Everything about checkpoints in one place: reading, unwrapping, checking, and each family's key rules.

* `errors`: the `CheckpointError` family (each error names the file and the problem).
* `io`: the one safe reader (`read_raw`, `read_state_dict`), the one unwrapping rule (`unwrap_checkpoint`)
  and the value checks (`non_finite_keys`, `check_state_dict_values`, `check_finite`).
* `match`: the one strict matcher (`match_keys`, `mismatch_parts`, `check_state_dict`) and its hints.
* `kcla_mrla`, `cnntention`, `gradattn`, `attention_shortcuts`: one rules module per family, each with the
  official-layout detection (`is_official`, `official_type`), the key remap and `filter_checkpoint(state_dict,
  model)`, the family's timm `checkpoint_filter_fn`.
* `timm_entry`: `build_checked`, timm's own entry points with one clear error per bad checkpoint (imported
  on first use: only needed when loading weights).

The package knows no model class: what it needs to know about architectures (to suggest one that fits a
checkpoint) comes from the family registry, `timm_layerattn.families`.
"""
from typing import Any, Mapping, Optional

from . import attention_shortcuts, cnntention, gradattn, kcla_mrla
from .errors import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError)
from .io import (
    check_finite, check_state_dict_values, non_finite_keys, read_raw, read_state_dict, unwrap_checkpoint,
    unwrap_state_dict)
from .match import KeyMatch, check_state_dict, fit_hints, match_keys, mismatch_parts, suggest_arch

__all__ = [
    'PretrainedWeightsError', 'CheckpointError', 'CheckpointNotFoundError', 'CheckpointNotCachedError',
    'CheckpointMismatchError', 'read_raw', 'read_state_dict', 'unwrap_checkpoint', 'unwrap_state_dict',
    'non_finite_keys', 'check_state_dict_values', 'check_finite', 'KeyMatch', 'match_keys', 'mismatch_parts',
    'check_state_dict', 'fit_hints', 'suggest_arch', 'CONVERTIBLE', 'official_layout',
    'kcla_mrla', 'cnntention', 'gradattn', 'attention_shortcuts',
]

# The rules modules whose official layouts `convert_official` converts, in the order they are told apart.
# GradAttn's notebook checkpoints load through the model's filter only; attention shortcuts have no official
# layout.
CONVERTIBLE = (kcla_mrla, cnntention)


def official_layout(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which official code wrote `state_dict`, of the convertible layouts: 'kcla', 'mrla_light', 'mrla_base',
    'cnntention', or None (this package's layout, which is also timm's / torchvision's)."""
    for rules in CONVERTIBLE:
        found = rules.official_type(state_dict)
        if found is not None:
            return found
    return None
