"""Checkpoint rules of the EfficientNet MRLA-light family (`models/efficientnet_la.py`).

The official code (joyfang1106/MRLA before commit 2915aff, a timm 0.4.9 fork) keeps timm's EfficientNet names for
the trunk (`conv_stem`, `bn1`, `blocks.S.i.{conv_pw,bn1,conv_dw,bn2,se,conv_pwl,bn3}`, `conv_head`, `bn2`,
`classifier`) and adds to each InvertedResidual with a skip a module `mrla` (its layer `mla` with `Wq`, `Wk`,
`Wv`, and `lambda_t`) and `bn_mrla`. Renamed here to the cell `attn` (`attn.{q,k,v}`, `attn.lambda_t`,
`attn.norm`): the `mrla.lambda_t` / `bn_mrla` names are the ResNet code's too, so those renames are
`kcla_mrla.remap_keys`'; only the layer's name `mla` is this code's own. Nothing is dropped: every official
module runs. Key table: docs/design/efficientnet_layer_attention.md#effnet-conversion.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .io import unwrap_checkpoint
from .kcla_mrla import remap_keys as mrla_remap_keys
from .rules import CheckpointRules, Remapped

__all__ = ['FAMILY', 'is_official', 'remap_keys', 'EfficientNetMrlaRules', 'RULES']

FAMILY = 'efficientnet_mrla_light'
# The official cell's layer, `blocks.S.i.mrla.mla.W{q,k,v}`, and this package's cell parameters.
_OFFICIAL = re.compile(r'^blocks\.\d+\.\d+\.mrla\.(mla\.W[qkv]\.weight|lambda_t)$')
_NATIVE = re.compile(r'^blocks\.\d+\.\d+\.attn\.lambda_t$')
_LAYER = (re.compile(r'\.mrla\.mla\.W([qkv])\.'), r'.attn.\1.')


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """True when `state_dict` holds an official EfficientNet-MRLA cell (`blocks.S.i.mrla.*`)."""
    return any(isinstance(k, str) and _OFFICIAL.match(k) for k in state_dict)


def remap_keys(state_dict: Mapping[str, Any]) -> Dict[Any, Any]:
    """Official names -> this package's (values and order unchanged)."""
    pattern, repl = _LAYER
    renamed = {pattern.sub(repl, k) if isinstance(k, str) else k: v for k, v in state_dict.items()}
    return mrla_remap_keys(renamed)


class EfficientNetMrlaRules(CheckpointRules):
    """Detects and renames the official EfficientNet-MRLA layout; a checkpoint in this package's layout (which is
    timm's for the trunk) passes through."""
    converts = True

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return FAMILY if is_official(state_dict) else None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return FAMILY if any(isinstance(k, str) and _NATIVE.match(k) for k in keys) else None

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        if not is_official(state_dict) and not any(isinstance(k, str) and '.attn.' in k for k in state_dict):
            raise UserError(f"no MRLA-light cells in this checkpoint, but '{arch}' is an EfficientNet MRLA-light "
                            f"model; for timm's plain efficientnet weights use timm_layerattn.load_trunk")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        renamed = remap_keys(state_dict)
        sources = {new: old for new, old in zip(renamed, state_dict) if isinstance(new, str)}
        return Remapped(renamed, sources, [])

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict, _ = unwrap_checkpoint(state_dict)
        return remap_keys(state_dict) if is_official(state_dict) else state_dict


RULES = EfficientNetMrlaRules()
