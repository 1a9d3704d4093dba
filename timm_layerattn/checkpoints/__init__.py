"""Everything about checkpoints in one place: reading, unwrapping, checking, and each family's key rules.

* `errors`: the `CheckpointError` family (each error names the file and the problem).
* `io`: the one safe reader (`read_raw`, `read_state_dict`), the one unwrapping rule (`unwrap_checkpoint`)
  and the value checks (`non_finite_keys`, `check_state_dict_values`, `check_finite`).
* `match`: the one strict matcher (`match_keys`, `mismatch_parts`, `check_state_dict`) and its hints.
* `rules`: the `CheckpointRules` interface that every family's rules object implements (detect, remap with a
  report, check, hint, filter), and what is read from the registered families' rules: `official_layout`,
  `CONVERTIBLE`, the known-but-unsupported official layouts (`unsupported_layout`).
* `kcla_mrla`, `cnntention`, `gradattn`, `attention_shortcuts`: one rules module per family, each with the
  official-layout detection (`is_official`, `official_type`), the key remap, `filter_checkpoint(state_dict,
  model)` (the family's timm `checkpoint_filter_fn`) and its rules object (`RULES`), which the family's
  `Family.rules` holds.
* `timm_entry`: `build_checked`, timm's own entry points with one clear error per bad checkpoint (imported
  on first use: only needed when loading weights).

The package knows no model class: what it needs to know about architectures and families (to suggest an
architecture that fits a checkpoint, to tell layouts apart) comes from the family registry,
`timm_layerattn.families`, read at call time (it is filled when `timm_layerattn.models` is imported).
"""
from typing import Any

from . import attention_shortcuts, cnntention, gradattn, kcla_mrla
from .errors import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError)
from .io import (
    check_finite, check_state_dict_values, non_finite_keys, read_raw, read_state_dict, unwrap_checkpoint,
    unwrap_state_dict)
from .match import KeyMatch, check_state_dict, fit_hints, match_keys, mismatch_parts, suggest_arch
from .rules import CheckpointRules, Remapped, convertible_modules, official_layout, unsupported_layout

__all__ = [
    'PretrainedWeightsError', 'CheckpointError', 'CheckpointNotFoundError', 'CheckpointNotCachedError',
    'CheckpointMismatchError', 'read_raw', 'read_state_dict', 'unwrap_checkpoint', 'unwrap_state_dict',
    'non_finite_keys', 'check_state_dict_values', 'check_finite', 'KeyMatch', 'match_keys', 'mismatch_parts',
    'check_state_dict', 'fit_hints', 'suggest_arch', 'CheckpointRules', 'Remapped', 'CONVERTIBLE',
    'official_layout', 'unsupported_layout', 'kcla_mrla', 'cnntention', 'gradattn', 'attention_shortcuts',
]


def __getattr__(name: str) -> Any:
    # `CONVERTIBLE`: the rules modules whose official layouts `convert_official` converts, in the order they
    # are told apart; derived from the registry on each access (`rules.convertible_modules`). GradAttn's
    # notebook checkpoints load through the model's filter only; attention shortcuts have no official layout.
    if name == 'CONVERTIBLE':
        return convertible_modules()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
