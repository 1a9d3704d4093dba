"""Checkpoint rules of dynamic layer attention (DLA-light, DLA-base).

Official layouts (key tables in docs/design/dynamic_layer_attention.md#dyn-conversion): each stage is a
wrapper holding the trunk blocks (`layers.i`), the attention modules (`attention.i`, MRLA inside
`layer_attention`), the dynamic sharing unit (`lstm`) and DLA-light's depth-wise `excite` conv (`extict` in
the ImageNet code). The CIFAR code (bgx666/KCLA and tunantu/Dynamic-Layer-Attention `cifar/models/cifar/dla_{l,b}.py`)
numbers stages `stages.s`, the ImageNet code (`imagenet/models/resnet_dla_l.py`) names them `layerS`. The KCLA
repository's CIFAR DLA-light also saves a top-level `bn2` that never runs; it is dropped and reported.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._utils.errors import UserError
from .rules import KindRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'UNUSED', 'official_type', 'remap', 'native_kind', 'DynamicLARules', 'RULES']

# Official names -> this package. The rules apply in order to every key (after unwrapping).
KEY_RULES: Tuple[Tuple[str, Any], ...] = (
    (r'^stages\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.'),
    (r'^(layer\d+)\.layers\.(\d+)\.', r'\1.\2.'),
    (r'^(layer\d+)\.attention\.(\d+)\.layer_attention\.(?:layer_attention|mrla)\.W([qkv])\.', r'\1.\2.attn.mrla.\3.'),
    (r'^(layer\d+)\.attention\.(\d+)\.layer_attention\.lambda_t$', r'\1.\2.attn.mrla.lambda_t'),
    (r'^(layer\d+)\.attention\.(\d+)\.bn_layer_attention\.', r'\1.\2.attn.mrla.norm.'),
    (r'^(layer\d+)\.lstm\.(w_ih|w_hh)\.0\.seq\.', r'\1.attn_in.\2.'),
    (r'^(layer\d+)\.(?:excite|extict)\.', r'\1.attn_in.excite.'),
)
# Official modules that never run: the CIFAR DLA-light's top-level `bn2` (its forward has `#x = self.bn2(x)`).
UNUSED = re.compile(r'^bn2\.')
_DSU = '.lstm.w_ih.0.seq.'


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'dynamic_la_light' or 'dynamic_la_base' for an official DLA checkpoint, else None.

    Told from the sharing unit (`lstm.w_ih.0.seq`, which DIANet's official layout shares) together with the
    attention's `bn_layer_attention`; DLA-light's attention has `lambda_t`."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if not (any(_DSU in k for k in keys) and any('.bn_layer_attention.' in k for k in keys)):
        return None
    light = any(k.endswith('.layer_attention.lambda_t') for k in keys)
    return 'dynamic_la_light' if light else 'dynamic_la_base'


def remap(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
    """Rename an official DLA checkpoint for the model whose state dict is `expected`; the official modules
    that never run (`UNUSED`) and that the model lacks are dropped and reported by their official names."""
    out: Dict[Any, Any] = {}
    source_names: Dict[str, str] = {}
    dropped: List[str] = []
    for k, v in state_dict.items():
        new = rename_key(k, KEY_RULES)
        if isinstance(new, str):
            if UNUSED.match(new) and new not in expected:
                dropped.append(k)
                continue
            source_names[new] = k
        out[new] = v
    return Remapped(out, source_names, dropped)


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'dynamic_la_light' / 'dynamic_la_base' for a state dict in this package's layout, else None."""
    keys = [k for k in keys if isinstance(k, str)]
    if not any(re.match(r'^layer\d+\.attn_in\.w_ih\.0\.weight$', k) for k in keys):
        return None
    return 'dynamic_la_light' if any(k.endswith('.attn.mrla.lambda_t') for k in keys) else 'dynamic_la_base'


def _dsu_reduction(state_dict: Mapping[str, Any], key: str) -> Optional[int]:
    w = state_dict.get(key)
    return w.shape[1] // w.shape[0] if w is not None and getattr(w, 'ndim', 0) == 2 and w.shape[0] else None


class DynamicLARules(KindRules):
    """The rules of one DLA form ('dynamic_la_light' or 'dynamic_la_base')."""
    converts = True
    detect_official = staticmethod(official_type)
    detect_native = staticmethod(native_kind)

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """The DSU's hidden width is fixed by the architecture (`dsu_reduction`): one that differs is refused
        with the value to use. The head dim cannot be read from a checkpoint (it sets no shape)."""
        official = official_type(state_dict) is not None
        key = next((k for k in state_dict if isinstance(k, str) and k.endswith(
            _DSU + '0.weight' if official else '.attn_in.w_ih.0.weight')), None)
        if key is None:
            raise UserError(f"no dynamic sharing unit in this checkpoint, but '{arch}' is a {self.kind} model")
        found = _dsu_reduction(state_dict, key)
        model = getattr(getattr(cfg, 'strategy', None), 'dsu_reduction', None)
        if found is not None and model is not None and found != model:
            raise UserError(
                f"the checkpoint's dynamic sharing unit has reduction {found} ({key}: "
                f"{tuple(state_dict[key].shape)}) but '{arch}' uses {model}; build the model with "
                f"dsu_reduction={found} (timm.create_model('{arch}', dsu_reduction={found}))")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return remap(state_dict, expected)


RULES = {kind: DynamicLARules(kind) for kind in ('dynamic_la_light', 'dynamic_la_base')}
