"""Checkpoint rules of CNNtention (CIFAR ResNet-20 with SelfAtt, MHA or CBAM after each stage).

The authors' code (AttentionSeekers/CNNtention) keeps the attention module after stage i as `att{i}`; this
package makes it the stage's exit unit `layer{i}.attn`. Trunk keys are the same. The MHA module computes
`key^T @ query` with the softmax over the `query` axis: its `key` conv makes the queries and its `query` conv
the keys, so the two swap places. See docs/design/cnntention.md#cnn-conversion.

`remap` renames an official checkpoint for timm's entry points (`filter_checkpoint`) and `convert_official`
alike; `RULES.check_source` refuses an official checkpoint of another variant than the target's.
"""
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from . import kcla_mrla
from .rules import CheckpointRules, Remapped

__all__ = [
    'VARIANT_RULES', 'is_official', 'official_type', 'official_variant', 'remap_keys', 'remap', 'native_kind',
    'filter_checkpoint', 'CnntentionRules', 'RULES',
]

# The official attention keys (after stage i: `att{i}.*`).
_OFFICIAL = re.compile(
    r'^att\d\.(weights$|query\.|key\.|value\.|val\.|linear\.|channel_attention\.|spatial_attention\.)')

# Official module names -> ours, per variant (MHA's key / query swapped, see the module docstring).
VARIANT_RULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    'selfatt': (('weights', 'gamma'), ('query', 'q'), ('key', 'k'), ('value', 'v')),
    'mha': (('weights', 'gamma'), ('key', 'q'), ('query', 'k'), ('val', 'v'), ('linear', 'proj')),
    'cbam': (('channel_attention.mlp.0', 'channel_mlp.fc1'), ('channel_attention.mlp.2', 'channel_mlp.fc2'),
             ('spatial_attention.conv', 'spatial_conv')),
}
# This package's own attention keys, per variant, in the order they are told apart (MHA also has `gamma`).
_NATIVE_KINDS = (
    ('CNNtention cbam', re.compile(r'\.attn\.channel_mlp\.', re.M)),
    ('CNNtention mha', re.compile(r'^layer\d+\.attn\.proj\.', re.M)),
    ('CNNtention selfatt', re.compile(r'^layer\d+\.attn\.gamma$', re.M)),
)


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """True when `state_dict` holds the authors' attention keys (`att{i}.*`)."""
    return any(isinstance(k, str) and _OFFICIAL.match(k) for k in state_dict)


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'cnntention' for a checkpoint of the authors' code, else None."""
    return 'cnntention' if is_official(state_dict) else None


def official_variant(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The variant ('selfatt', 'mha', 'cbam') of an official checkpoint, from its `att*` keys; None if none."""
    keys = [k for k in state_dict if isinstance(k, str) and k.startswith('att')]
    if any('.channel_attention.' in k for k in keys):
        return 'cbam'
    if any('.linear.' in k or '.val.' in k for k in keys):
        return 'mha'
    if any('.query.' in k for k in keys):
        return 'selfatt'
    return None


def _rename(key: Any, rules: Tuple[Tuple[str, str], ...]) -> Any:
    m = re.match(r'^att(\d)\.(.+)$', key) if isinstance(key, str) else None
    if m is None:
        return key
    rest = m.group(2)
    for old, new in rules:
        if rest == old or rest.startswith(old + '.'):
            rest = new + rest[len(old):]
            break
    return f'layer{m.group(1)}.attn.{rest}'


def remap_keys(state_dict: Mapping[str, Any], variant: str) -> Dict[str, Any]:
    """Rename the official attention keys (`att{i}.*`, the module after stage i) to this package's names
    (`layer{i}.attn.*`, the stage's exit unit); trunk keys are unchanged.

    Args:
        variant: 'selfatt', 'mha' or 'cbam'.
    """
    if variant not in VARIANT_RULES:
        raise ValueError(f'unknown CNNtention variant {variant!r}, expected one of {sorted(VARIANT_RULES)}')
    return {_rename(k, VARIANT_RULES[variant]): v for k, v in state_dict.items()}


def remap(state_dict: Mapping[str, Any], expected: Optional[Mapping[str, Any]] = None) -> Remapped:
    """Rename an official checkpoint (`remap_keys` with its own variant) and give the scalar `gamma` its
    1-element shape; a checkpoint without official attention keys is returned as it is. Nothing is dropped:
    every official module runs. `expected` (the model's state dict) is not needed."""
    variant = official_variant(state_dict)
    if variant is None:
        return Remapped(dict(state_dict))
    out: Dict[Any, Any] = {}
    source_names: Dict[str, str] = {}
    for k, v in state_dict.items():
        new = _rename(k, VARIANT_RULES[variant])
        if isinstance(new, str):
            if new.endswith('.attn.gamma') and isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.reshape(1)
            source_names[new] = k
        out[new] = v
    return Remapped(out, source_names)


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'CNNtention <variant>' for a state dict in this package's layout, from its key names; None if none."""
    text = '\n'.join(k for k in keys if isinstance(k, str))
    return next((kind for kind, pattern in _NATIVE_KINDS if pattern.search(text)), None)


def filter_checkpoint(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model` (the family's timm `checkpoint_filter_fn`).

    The layer-attention family's filter first (unwrapping, official trunk names), then the authors' `att{i}.*`
    keys are renamed and the scalar `gamma` gets its 1-element shape (`remap`). A checkpoint already in this
    package's layout passes through unchanged.
    """
    state_dict = kcla_mrla.filter_checkpoint(state_dict, model)
    if official_variant(state_dict) is None:
        return state_dict
    return remap(state_dict).state_dict


class CnntentionRules(CheckpointRules):
    """CNNtention: the official variant (from the checkpoint's `att*` keys) must be the target's (from its
    architecture config, `StageAttention.kind`)."""
    converts = True

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return official_type(state_dict)

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return native_kind(keys)

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        if official_type(state_dict) is None:
            return {}
        variant = official_variant(state_dict)
        target_variant = getattr(getattr(cfg, 'strategy', None), 'kind', None)
        if variant != target_variant:
            raise UserError(f"this is a CNNtention {variant} checkpoint, but '{arch}' is the {target_variant} model")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return remap(state_dict, expected)

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return filter_checkpoint(state_dict, model)


RULES = CnntentionRules()
