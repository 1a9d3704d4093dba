"""Checkpoint rules of full and linear layer attention (docs/design/full_layer_attention.md#fla-conversion).

Official layouts:

* the KCLA repository's CIFAR code (`layer_attention.py`, `linear_attention.py`): stages `stages.s.i`
  (`s` from 0), the attention `mrla.mrla.W{q,k,v}` and its norm `bn_mrla` in the block. The same keys and shapes
  as that repository's MRLA-base CIFAR code (`mrla_base.py`): a file does not say which of the three wrote it,
  so these rules claim it for their own family only when asked for a target of that family (`convert_official`
  asks the target's rules first); told apart by registry order, such a file reads as MRLA-base;
* MRLA's eq. 4 ImageNet code (`resnet_la_eq4.py`): trunk keys as timm's, the attention `la.W{q,k,v}` and its norm
  `bn_la` in the block (full layer attention only).

No official module of these layouts goes unused, so nothing is dropped.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._utils.errors import UserError
from .rules import CheckpointRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'official_layout_of', 'FullLARules', 'RULES']

# Official names -> this package. Applied in order to every key (after unwrapping).
KEY_RULES: Tuple[Tuple[str, Any], ...] = (
    (r'^stages\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.'),
    (r'\.mrla\.mrla\.Wq\.', '.attn.query.'),
    (r'\.mrla\.mrla\.Wk\.', '.attn.key.'),
    (r'\.mrla\.mrla\.Wv\.', '.attn.value.'),
    (r'\.bn_mrla\.', '.attn.norm.'),
    (r'\.la\.Wq\.', '.attn.query.'),
    (r'\.la\.Wk\.', '.attn.key.'),
    (r'\.la\.Wv\.', '.attn.value.'),
    (r'\.bn_la\.', '.attn.norm.'),
)
_EQ4 = re.compile(r'^layer\d+\.\d+\.la\.Wq\.weight$')
_CIFAR = re.compile(r'^stages\.\d+\.\d+\.mrla\.mrla\.Wq\.weight$')
_NATIVE = re.compile(r'^layer\d+\.\d+\.attn\.query\.weight$')
_SUFFIX = {'full_la': 'la', 'linear_la': 'linla'}


def official_layout_of(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'eq4' (MRLA's eq. 4 ImageNet code), 'cifar' (the KCLA repository's CIFAR cells, shared by its MRLA-base,
    full and linear layer attention) or None."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(_EQ4.match(k) for k in keys):
        return 'eq4'
    if any(_CIFAR.match(k) for k in keys) and not any(k.endswith('.mrla.lambda_t') for k in keys):
        return 'cifar'
    return None


class FullLARules(CheckpointRules):
    """The rules of 'full_la' (the CIFAR and eq. 4 layouts) or 'linear_la' (the CIFAR layout)."""
    converts = True

    def __init__(self, kind: str):
        self.kind = kind

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        layout = official_layout_of(state_dict)
        if layout == 'cifar' or (layout == 'eq4' and self.kind == 'full_la'):
            return self.kind
        return None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        # Full and linear layer attention share one parameter layout; the architecture tells them apart.
        return 'full_la' if self.kind == 'full_la' and any(isinstance(k, str) and _NATIVE.match(k) for k in keys) \
            else None

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        layout = official_layout_of(state_dict)
        if layout is None:
            if not any(isinstance(k, str) and _NATIVE.match(k) for k in state_dict):
                raise UserError(f"no layer-attention keys in this checkpoint, but '{arch}' is a {self.kind} model")
            return {}
        imagenet = getattr(cfg, 'stem_type', None) == ''
        if (layout == 'eq4') != imagenet:
            if layout == 'eq4':
                src, use = "MRLA's eq. 4 ImageNet code", "'resnet50_la'"
            else:
                src, use = "the KCLA repository's CIFAR code", f"a cifar_resnet*_{_SUFFIX[self.kind]} model"
            raise UserError(f"this checkpoint comes from {src}, which '{arch}' does not follow; use {use}")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        out: Dict[Any, Any] = {}
        source_names: Dict[str, str] = {}
        for k, v in state_dict.items():
            new = rename_key(k, KEY_RULES)
            if isinstance(new, str):
                source_names[new] = k
            out[new] = v
        return Remapped(out, source_names, [])

    def hints(self, state_dict: Mapping[str, Any], cfg: Any, *, mismatched: Sequence[str] = (),
              backbone: bool = False) -> List[str]:
        return []


RULES = {'full_la': FullLARules('full_la'), 'linear_la': FullLARules('linear_la')}
