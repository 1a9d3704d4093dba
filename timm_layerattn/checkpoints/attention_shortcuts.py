"""Checkpoint rules of the attention-shortcut family (AS_out, AS_KV, AS_stages and their baselines).

No official code exists, so there is no official layout to convert. What this family adds is a warm start:
an AS_stages model keeps the whole ResNet trunk, so a timm / torchvision ResNet checkpoint holds every one of
its tensors except the stage-entry attention sites (`layerS.attn_in.*`). Those are filled from the model's
own initialisation, so loading stays strict and any other mismatch still fails loudly. See
docs/design/attention_shortcuts.md#as-state-dict.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from . import kcla_mrla
from .rules import CheckpointRules

__all__ = ['is_official', 'official_type', 'is_plain_trunk', 'native_kind', 'filter_checkpoint']

# Every variant has the shared `as_proj.*` or a site's own query (`attn_in.q`); other families' stage entry
# units are `attn_in` too.
_NATIVE = re.compile(r'(^as_proj\.|\.attn_in\.q\.weight$)', re.M)


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """Always False: the family has no official code, hence no official layout."""
    return False


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Always None (see `is_official`)."""
    return None


def is_plain_trunk(state_dict: Mapping[str, Any]) -> bool:
    """True when `state_dict` has no attention-site keys (`*.attn_in.*`): a plain ResNet to warm-start from."""
    return not any(isinstance(k, str) and '.attn_in.' in k for k in state_dict)


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'attention-shortcut' for a state dict of this family (shared `as_proj.*` or site `attn_in` keys)."""
    return 'attention-shortcut' if _NATIVE.search('\n'.join(k for k in keys if isinstance(k, str))) else None


def filter_checkpoint(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model` (the family's timm `checkpoint_filter_fn`).

    The layer-attention family's filter first (unwrapping), then a plain ResNet checkpoint gets the model's
    own attention-site tensors (`layerS.attn_in.*`) it lacks. Any other checkpoint passes through unchanged.
    """
    state_dict = kcla_mrla.filter_checkpoint(state_dict, model)
    if is_plain_trunk(state_dict):
        for k, v in model.state_dict().items():
            if '.attn_in.' in k and k not in state_dict:
                state_dict[k] = v
    return state_dict


class _Rules(CheckpointRules):
    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return official_type(state_dict)

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return native_kind(keys)

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return filter_checkpoint(state_dict, model)


RULES = _Rules()
