"""Checkpoint rules of the DeiT + layer-attention families (MRLA-light, MRLA-base; KCLA has no official layout).

The official DeiT-MRLA code (joyfang1106/MRLA `deit/deit_mrla_{light,base}.py`) is a copy of timm 0.3.2's
ViT, so its trunk keys are timm's (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.{norm1,attn,norm2,
mlp}`, `norm`, `head`); only the per-block module differs: `blocks.i.mrla` holds `normx` (the LayerNorm of the
block output), MRLA-light's `normo` (of the block input) and `lambda_t`, and the inner `mrla` with the
`W{q,k,v}` projections. This package names the module `blocks.i.layer_attn` with `norm`, `norm_prev`,
`lambda_t`, `q`, `k`, `v`. Key tables: docs/design/vit_layer_attention.md#vit-conversion.

`remap` is the one renaming, used by timm's `pretrained=True` (`filter`) and by `convert_official` alike.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .io import unwrap_checkpoint
from .rules import KindRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'official_type', 'remap_keys', 'native_kind', 'DeiTLayerAttnRules', 'RULES']

# Official names -> this package, applied in order to every key.
KEY_RULES: Tuple[Tuple[str, str], ...] = (
    (r'^(blocks\.\d+)\.mrla\.mrla\.W([qkv])\.', r'\1.layer_attn.\2.'),
    (r'^(blocks\.\d+)\.mrla\.normx\.', r'\1.layer_attn.norm.'),
    (r'^(blocks\.\d+)\.mrla\.normo\.', r'\1.layer_attn.norm_prev.'),
    (r'^(blocks\.\d+)\.mrla\.lambda_t$', r'\1.layer_attn.lambda_t'),
)
_OFFICIAL = re.compile(r'^blocks\.\d+\.mrla\.')
# This package's own keys, per family, in the order they are told apart (KCLA's cell also has `v`).
_NATIVE_KINDS = (
    ('deit_kcla', re.compile(r'^blocks\.\d+\.layer_attn\.cell\.norm_d$', re.M)),
    ('deit_mrla_light', re.compile(r'^blocks\.\d+\.layer_attn\.lambda_t$', re.M)),
    ('deit_mrla_base', re.compile(r'^blocks\.\d+\.layer_attn\.v\.weight$', re.M)),
)


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'deit_mrla_light' (a `blocks.i.mrla.lambda_t` key), 'deit_mrla_base' (`blocks.i.mrla.mrla.Wq` without
    lambda) or None."""
    keys = [k for k in state_dict if isinstance(k, str) and _OFFICIAL.match(k)]
    if not keys:
        return None
    if any(k.endswith('.mrla.lambda_t') for k in keys):
        return 'deit_mrla_light'
    return 'deit_mrla_base' if any('.mrla.mrla.Wq.' in k for k in keys) else None


def remap_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename official DeiT-MRLA keys to this package's layout (values and order unchanged)."""
    return {rename_key(k, KEY_RULES): v for k, v in state_dict.items()}


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """The family of a state dict in this package's DeiT layout, from its key names; None if none."""
    text = '\n'.join(k for k in keys if isinstance(k, str))
    return next((kind for kind, pattern in _NATIVE_KINDS if pattern.search(text)), None)


class DeiTLayerAttnRules(KindRules):
    """The rules of one DeiT layer-attention family ('deit_mrla_light', 'deit_mrla_base', 'deit_kcla').

    MRLA files of the official code convert; KCLA has no official ViT code, so its rules only name its layout.
    """
    detect_official = staticmethod(official_type)
    detect_native = staticmethod(native_kind)

    def __init__(self, kind: str, converts: bool):
        super().__init__(kind)
        self.converts = converts

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """An official file of the distilled DeiT (a `dist_token`) has a second head the registered models lack;
        a file in this package's layout must hold the family's keys."""
        if 'dist_token' in state_dict:
            raise UserError(
                "this is a distilled DeiT checkpoint (dist_token, head_dist); the registered DeiT layer-attention "
                f"models have one class token: '{arch}' cannot take it")
        if official_type(state_dict) is None and native_kind(list(state_dict)) != self.kind:
            raise UserError(f"no {self.kind} layer-attention keys in this checkpoint, but '{arch}' is a "
                            f"{self.kind} model")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        renamed = [rename_key(k, KEY_RULES) for k in state_dict]
        source = {new: k for new, k in zip(renamed, state_dict) if isinstance(new, str) and new != k}
        return Remapped(dict(zip(renamed, state_dict.values())), source, [])

    def hints(self, state_dict: Mapping[str, Any], cfg: Any, *, mismatched: Sequence[str] = (),
              backbone: bool = False) -> List[str]:
        if any(k.endswith('pos_embed') for k in mismatched):
            return ['the position embedding was trained at another image size: build the model with that '
                    'img_size (timm resamples it on the fly with dynamic_img_size=True)']
        return []

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict, _ = unwrap_checkpoint(state_dict)
        return remap_keys(state_dict) if official_type(state_dict) is not None else state_dict


RULES = {
    'deit_mrla_light': DeiTLayerAttnRules('deit_mrla_light', converts=True),
    'deit_mrla_base': DeiTLayerAttnRules('deit_mrla_base', converts=True),
    'deit_kcla': DeiTLayerAttnRules('deit_kcla', converts=False),
}
