"""Checkpoint rules of RLA-Net (joyfang1106/RLANet, the ImageNet `RLA_ResNet` of `models/resnet_rla.py`).

The official network keeps its blocks in `stages.s.i` (stages from 0), each stage's shared convs in
`conv_outs.s` / `recurrent_convs.s`, the per-block stream norms in `stage_bns.s.i` and the final stream norm in
`bn2`; the stem and `fc` are torchvision's. Its training script saves `{'epoch', 'arch', 'state_dict',
'best_acc1', 'optimizer'}` with the model under `module.` (DistributedDataParallel): the published ImageNet
files have this layout, and `io.unwrap_checkpoint` takes the `state_dict` out and strips the prefix. Key table:
docs/design/rla.md#rla-conversion.

Every official module runs, so nothing is dropped. `check_source` refuses what the target cannot take with one
line: another stream width, and the RLA-ECANet checkpoints (`stages.s.i.eca.*`, not part of this package).
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .._utils.errors import UserError
from .rules import CheckpointRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'is_official', 'official_type', 'official_rla_chs', 'remap', 'native_kind', 'RlaRules',
           'RULES']

# Official names -> this package. Applied in order to every key (after unwrapping).
KEY_RULES: Tuple[Tuple[str, Any], ...] = (
    (r'^stages\.(\d+)\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.{m.group(2)}.'),
    (r'^stage_bns\.(\d+)\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.{m.group(2)}.attn.bn.'),
    (r'^conv_outs\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.attn_in.conv_out.'),
    (r'^recurrent_convs\.(\d+)\.', lambda m: f'layer{int(m.group(1)) + 1}.attn_in.recurrent_conv.'),
    (r'^bn2\.', 'neck.bn.'),
)
_OFFICIAL = re.compile(r'^(recurrent_convs|conv_outs|stage_bns)\.\d+\.')
_NATIVE = re.compile(r'^layer\d+\.attn_in\.recurrent_conv\.weight$')
_ECA = re.compile(r'^stages\.\d+\.\d+\.eca\.')


def is_official(state_dict: Mapping[str, Any]) -> bool:
    """True when `state_dict` holds the official RLA modules' keys (`recurrent_convs.s.*`, ...)."""
    return any(isinstance(k, str) and _OFFICIAL.match(k) for k in state_dict)


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'rla' for a checkpoint of the official RLA-Net code, else None."""
    return 'rla' if is_official(state_dict) else None


def official_rla_chs(state_dict: Mapping[str, Any]) -> Optional[int]:
    """The stream width k of an official (`recurrent_convs.0`) or converted (`layer1.attn_in.recurrent_conv`)
    checkpoint, None if it has neither."""
    for key in ('recurrent_convs.0.weight', 'layer1.attn_in.recurrent_conv.weight'):
        w = state_dict.get(key)
        if w is not None and getattr(w, 'ndim', 0) == 4:
            return int(w.shape[0])
    return None


def remap(state_dict: Mapping[str, Any], expected: Optional[Mapping[str, Any]] = None) -> Remapped:
    """Rename an official RLA-Net checkpoint to this package's layout (values unchanged, nothing dropped:
    every official module runs). `expected` is not needed."""
    out: Dict[Any, Any] = {}
    source_names: Dict[str, str] = {}
    for k, v in state_dict.items():
        new = rename_key(k, KEY_RULES)
        if isinstance(new, str):
            source_names[new] = k
        out[new] = v
    return Remapped(out, source_names)


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'rla' for a state dict in this package's RLA layout, else None."""
    return 'rla' if any(isinstance(k, str) and _NATIVE.match(k) for k in keys) else None


def _model_rla_chs(cfg: Any) -> Optional[int]:
    return getattr(getattr(cfg, 'strategy', None), 'rla_chs', None)


class RlaRules(CheckpointRules):
    """RLA-Net: official files convert (and load through the model's filter) when their stream width is the
    model's; RLA-ECANet files are refused."""
    converts = True

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        return official_type(state_dict)

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        return native_kind(keys)

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        if any(isinstance(k, str) and _ECA.match(k) for k in state_dict):
            raise UserError(f"this is an RLA-ECANet checkpoint (ECA gates in every block); '{arch}' is RLA-Net "
                            f"without ECA, and RLA-ECANet is not part of timm_layerattn")
        if official_type(state_dict) is None and native_kind(list(state_dict)) is None:
            raise UserError(f"no RLA keys in this checkpoint (recurrent_convs / conv_outs / stage_bns), but '{arch}' "
                            f"is an RLA-Net model")
        have, want = official_rla_chs(state_dict), _model_rla_chs(cfg)
        if have is not None and want is not None and have != want:
            raise UserError(f"the checkpoint's RLA stream has {have} channels but '{arch}' is built with "
                            f"rla_channel={want}; use timm.create_model('{arch}', rla_channel={have})")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return remap(state_dict, expected)

    def model_kwargs(self, state_dict: Mapping[str, Any], cfg: Any) -> Tuple[Dict[str, Any], str]:
        have, want = official_rla_chs(state_dict), _model_rla_chs(cfg)
        if have is not None and want is not None and have != want:
            return {'rla_channel': have}, f'RLA stream width {have} (read from recurrent_conv)'
        return {}, ''

    def hints(self, state_dict: Mapping[str, Any], cfg: Any, *, mismatched: Sequence[str] = (),
              backbone: bool = False) -> List[str]:
        have, want = official_rla_chs(state_dict), _model_rla_chs(cfg)
        if have is not None and want is not None and have != want:
            return [f'the checkpoint has an RLA stream of {have} channels, the model {want}: build it with '
                    f'rla_channel={have}']
        return []


RULES = RlaRules()
