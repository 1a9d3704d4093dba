"""Checkpoint rules of GradAttn (residual-free ResNet-18 whose multi-scale tokens a transformer encoder combines).

The official notebooks (SoudeepGhoshal/GradAttn) keep the token encoder at the top level (`projections`,
`positional_embedding`, `transformer_encoder` / `transformer_layers`, `classifier`); this package makes it the
skeleton's `neck` and uses timm's `fc` head. The RoPE variant's separate `w_q` / `w_k` / `w_v` projections
become one `qkv`, and its recomputable `inv_freq` buffers are dropped. See
docs/design/gradattn.md#ga-conversion.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import kcla_mrla
from .rules import CheckpointRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'is_official', 'official_type', 'remap_keys', 'native_kind', 'filter_checkpoint']

# Official notebook names -> ours, applied in order to every key.
KEY_RULES: Tuple[Tuple[str, str], ...] = (
    (r'^projections\.(\d+)\.2\.', r'neck.proj.\1.'),
    (r'^positional_embedding$', 'neck.pos_embed'),
    (r'^(?:transformer_encoder\.layers|transformer_layers)\.(\d+)\.', r'neck.layers.\1.'),
    (r'\.self_attn\.in_proj_(weight|bias)$', r'.qkv.\1'),
    (r'\.self_attn\.(?:out_proj|w_o)\.', '.proj.'),
    (r'\.linear([12])\.', r'.fc\1.'),
    (r'^classifier\.', 'fc.'),
)
_ROPE_QKV = re.compile(r'^transformer_layers\.(\d+)\.self_attn\.w_([qkv])\.weight$')
_NATIVE = re.compile(r'^neck\.(proj|layers)\.', re.M)  # its token encoder (other necks exist)


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """True when `state_dict` is in the notebooks' layout (top-level `projections.` / `classifier.` keys)."""
    return any(isinstance(k, str) and k.startswith(('projections.', 'classifier.')) for k in state_dict)


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'gradattn' for a checkpoint of the official notebooks, else None."""
    return 'gradattn' if is_official(state_dict) else None


def remap_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename the notebooks' keys to this package's layout, concatenating RoPE's `w_q / w_k / w_v` into `qkv`
    and dropping the `inv_freq` buffers."""
    out, qkv = {}, {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            out[k] = v
            continue
        if k.endswith('.rotary_emb.inv_freq'):
            continue
        m = _ROPE_QKV.match(k)
        if m:
            qkv.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        out[rename_key(k, KEY_RULES)] = v
    for j, parts in qkv.items():
        out[f'neck.layers.{j}.qkv.weight'] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    return out


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'gradattn' for a state dict in this package's layout (token-encoder `neck.*` keys), else None."""
    return 'gradattn' if _NATIVE.search('\n'.join(k for k in keys if isinstance(k, str))) else None


def filter_checkpoint(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model` (the family's timm `checkpoint_filter_fn`).

    The layer-attention family's filter first (unwrapping), then a notebook-trained state dict is renamed
    (`remap_keys`). A checkpoint already in this package's layout passes through unchanged.
    """
    state_dict = kcla_mrla.filter_checkpoint(state_dict, model)
    if not is_official(state_dict):
        return state_dict
    return remap_keys(state_dict)


class _Rules(CheckpointRules):
    """GradAttn: no official weights exist; a notebook-trained state dict loads through the model's filter
    only (docs/design/gradattn.md#ga-conversion), so `converts` stays False and `convert_official` does not
    detect the notebooks' layout."""

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return official_type(state_dict)

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return native_kind(keys)

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return Remapped(remap_keys(state_dict))

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return filter_checkpoint(state_dict, model)


RULES = _Rules()
