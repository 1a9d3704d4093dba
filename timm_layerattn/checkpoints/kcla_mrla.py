"""Checkpoint rules of the layer-attention family (KCLA, MRLA-light, MRLA-base; ImageNet and CIFAR depths).

The official code (bgx666/KCLA, joyfang1106/MRLA) names modules differently from this package: KCLA's
ImageNet stages keep trunk blocks and attention cells in parallel containers (`layerS.layers.i` /
`layerS.attention.i`), the CIFAR code and MRLA-base number stages from 0 (`stages.s.i`), the attention
module is `kcla` / `mrla` with `W{q,k,v}` projections, and KCLA's `norm_d` is stored as a 5-D tensor.
The trunk keys are otherwise timm's / torchvision's. The key tables are in
docs/design/layer_attention.md#la-conversion.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .io import unwrap_checkpoint
from .rules import CheckpointRules

__all__ = [
    'KEY_RULES', 'UNUSED', 'is_official', 'official_type', 'remap_keys', 'kcla_heads', 'infer_head_dim',
    'native_kind', 'filter_checkpoint',
]

# Official names -> this package. The rules apply in order to every key (after unwrapping).
KEY_RULES: Tuple[Tuple[str, Any], ...] = (
    # KCLA ImageNet: trunk and attention cells live in parallel containers of each stage.
    (r'^(layer\d+)\.layers\.(\d+)\.', r'\1.\2.'),
    (r'^(layer\d+)\.attention\.(\d+)\.', r'\1.\2.attn.'),
    # KCLA CIFAR / MRLA-B (ImageNet and CIFAR): `stages.s.i` is `layer{s+1}.i`.
    (r'^stages\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.'),
    (r'\.kcla\.', '.attn.'),
    # MRLA: module `mrla` (holding `mrla.W*` and `lambda_t`) and `bn_mrla` in the block.
    (r'\.mrla\.mrla\.W([qkv])\.', r'.attn.\1.'),
    (r'\.mrla\.lambda_t$', '.attn.lambda_t'),
    (r'\.bn_mrla\.', '.attn.norm.'),
    # KCLA cell internals.
    (r'\.attn\.W([qkv])\.', r'.attn.\1.'),
    (r'\.attn\.head_att\.', '.attn.head_gate.'),
    (r'\.attn\.bn_attention\.', '.attn.norm.'),
    (r'\.attn\.adjust_channel\.', '.attn.hist_proj.'),
    (r'\.attn\.u_Wk\.', '.attn.hist_k.'),
    (r'\.attn\.u_bn\.', '.attn.hist_norm.'),
)
# Official KCLA modules that exist but never run (the history re-init parts of cells that get no history, or
# whose width does not change); dropped when the model lacks them.
UNUSED = re.compile(r'\.attn\.(hist_proj|hist_k|hist_norm)\.')
# Any key named by the official code (trunk containers included).
_OFFICIAL_NAMES = re.compile(r'(\.layers\.\d+\.|\.attention\.\d+\.|^stages\.|\.mrla\.|\.bn_mrla\.|\.kcla\.)')
# This package's own attention keys, per type, in the order they are told apart (KCLA also has `attn.v`).
_NATIVE_KINDS = (
    ('kcla', re.compile(r'\.attn\.norm_d$', re.M)),
    ('mrla_light', re.compile(r'\.attn\.lambda_t$', re.M)),
    ('mrla_base', re.compile(r'^layer\d+\.\d+\.attn\.v\.weight$', re.M)),
)


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """True when any key is named by the official code, so the keys need `remap_keys`.

    Broader than `official_type`: a trunk-only checkpoint of the official code (`stages.s.i` keys) counts.
    """
    return any(isinstance(k, str) and _OFFICIAL_NAMES.search(k) for k in state_dict)


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which official attention code wrote `state_dict`: 'kcla', 'mrla_light', 'mrla_base', or None.

    Told from the attention modules' own keys (KCLA's `head_att`, MRLA-light's `lambda_t`, MRLA-base's
    `mrla.Wq`), so a trunk-only checkpoint is None.
    """
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.endswith('.head_att.weight') for k in keys):
        return 'kcla'
    if any(k.endswith('.mrla.lambda_t') for k in keys):
        return 'mrla_light'
    if any('.mrla.mrla.Wq.' in k for k in keys):
        return 'mrla_base'
    return None


def remap_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename official KCLA / MRLA keys to this package's layout (values and order unchanged)."""
    out = {}
    for k, v in state_dict.items():
        if isinstance(k, str):
            for pattern, repl in KEY_RULES:
                k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def kcla_heads(state_dict: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """(heads, channels) of the first KCLA cell, official (`Wv`) or this package's (`attn.v`) layout."""
    for k, v in state_dict.items():
        if isinstance(k, str) and k.endswith('.norm_d'):
            prefix = k[:-len('norm_d')]
            value = state_dict.get(prefix + 'Wv.weight', state_dict.get(prefix + 'v.weight'))
            if value is not None:
                return v.numel(), value.shape[0]
    return None


def infer_head_dim(state_dict: Mapping[str, Any]) -> Optional[int]:
    """Head dim of a KCLA checkpoint (channels per `norm_d` head), None for other checkpoints."""
    found = kcla_heads(state_dict)
    return found[1] // found[0] if found else None


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """The attention type of a state dict in this package's layout, from its key names; None if none."""
    text = '\n'.join(k for k in keys if isinstance(k, str))
    return next((kind for kind, pattern in _NATIVE_KINDS if pattern.search(text)), None)


def filter_checkpoint(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model` (the family's timm `checkpoint_filter_fn`).

    Unwraps training containers and prefixes (`io.unwrap_checkpoint`). A checkpoint already in this package's
    layout passes through unchanged. Official KCLA / MRLA checkpoints are renamed, `norm_d` is reshaped to
    its 1-D buffer form, and the official modules that never run are dropped when the model lacks them.
    """
    state_dict, _ = unwrap_checkpoint(state_dict)
    if not is_official(state_dict):
        return state_dict
    model_sd = model.state_dict()
    out = {}
    for k, v in remap_keys(state_dict).items():
        if k not in model_sd and isinstance(k, str) and UNUSED.search(k):
            continue
        if isinstance(k, str) and k.endswith('.attn.norm_d'):
            v = v.reshape(-1)
        out[k] = v
    return out


class LayerAttnRules(CheckpointRules):
    """The rules of one layer-attention type ('kcla', 'mrla_light', 'mrla_base'); `kind=None`: the plain
    trunk of the same official code (its CIFAR ResNets, whose stages are named `stages.s.i`)."""

    def __init__(self, kind: Optional[str] = None):
        self.kind = kind

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        found = official_type(state_dict)
        return found if found is not None and found == self.kind else None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        found = native_kind(keys)
        return found if found is not None and found == self.kind else None

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return filter_checkpoint(state_dict, model)


RULES = {kind: LayerAttnRules(kind) for kind in ('kcla', 'mrla_light', 'mrla_base')}
TRUNK_RULES = LayerAttnRules()
