"""Checkpoint rules of the channel-gate baselines (SE, ECA, DIANet on the bottleneck CIFAR ResNets).

The official code (bgx666/KCLA `cifar/models/cifar/{senet,ecanet,dia_resnet}.py`) keeps the trunk's torchvision
names and adds, per block, `se.fc.{0,2}` (SE's two linears) or `eca.conv` (ECA's conv); DIANet holds each
stage's blocks in `layerS.ModuleList.i` and the stage's cell in `layerS.lstm.w_{ih,hh}.0.seq.{0,2}`. Here the
gates are each block's pre-residual module (`layerS.i.attn_pre`) and DIANet's cell the stage's entry unit
(`layerS.attn_in.{ih,hh}.fc{1,2}`). Key tables: docs/design/channel_gates.md#cg-conversion.

`remap` is the one place that renames an official checkpoint and drops the SE layers that the official
Bottleneck builds but never runs (blocks of 256 channels or more, #cg-se-last-stage); timm's entry points
(`RULES[...].filter`) and `convert_official` both use it.
"""
import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .io import unwrap_checkpoint
from .rules import KindRules, Remapped, rename_key

__all__ = ['KEY_RULES', 'SE_SKIP_CHS', 'official_type', 'remap', 'native_kind', 'GateRules', 'RULES']

_logger = logging.getLogger(__name__)

# Official names -> this package, per family; applied in order to every key (after unwrapping).
KEY_RULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    'se': (
        (r'^(layer\d+\.\d+)\.se\.fc\.0\.', r'\1.attn_pre.fc1.'),
        (r'^(layer\d+\.\d+)\.se\.fc\.2\.', r'\1.attn_pre.fc2.'),
    ),
    'eca': ((r'^(layer\d+\.\d+)\.eca\.', r'\1.attn_pre.eca.'),),
    'dianet': (
        (r'^(layer\d+)\.ModuleList\.(\d+)\.', r'\1.\2.'),
        (r'^(layer\d+)\.lstm\.w_(ih|hh)\.0\.seq\.0\.', r'\1.attn_in.\2.fc1.'),
        (r'^(layer\d+)\.lstm\.w_(ih|hh)\.0\.seq\.2\.', r'\1.attn_in.\2.fc2.'),
    ),
}
# The official SE Bottleneck runs SE only where the branch has fewer channels (`if out.shape[1] < 256`).
SE_SKIP_CHS = 256

# Each family's official keys, and its keys in this package's layout.
_OFFICIAL = {
    'se': re.compile(r'^layer\d+\.\d+\.se\.fc\.[02]\.weight$', re.M),
    'eca': re.compile(r'^layer\d+\.\d+\.eca\.conv\.weight$', re.M),
    'dianet': re.compile(r'^layer\d+\.lstm\.w_ih\.0\.seq\.0\.weight$', re.M),
}
_DIANET_TRUNK = re.compile(r'^layer\d+\.ModuleList\.\d+\.', re.M)
_NATIVE = {
    'se': re.compile(r'^layer\d+\.\d+\.attn_pre\.fc1\.weight$', re.M),
    'eca': re.compile(r'^layer\d+\.\d+\.attn_pre\.eca\.conv\.weight$', re.M),
    'dianet': re.compile(r'^layer\d+\.attn_in\.ih\.fc1\.weight$', re.M),
}


def _text(keys: Sequence[Any]) -> str:
    return '\n'.join(k for k in keys if isinstance(k, str))


def official_type(state_dict: Mapping[str, Any]) -> Optional[str]:
    """'se', 'eca' or 'dianet' for a checkpoint of the official baselines' code, else None.

    DIANet is told from its cell keys together with its `ModuleList` block container (the official DLA code
    names its stage cells `lstm` too, but keeps its blocks in `layers`).
    """
    text = _text(list(state_dict))
    for kind, pattern in _OFFICIAL.items():
        if pattern.search(text) and (kind != 'dianet' or _DIANET_TRUNK.search(text)):
            return kind
    return None


def _never_runs(key: str, value: Any, expected: Mapping[str, Any]) -> bool:
    """True for a renamed official SE key that the model lacks and whose block has `SE_SKIP_CHS` or more
    channels: the official Bottleneck builds that SE layer and never runs it."""
    m = re.match(r'^layer\d+\.\d+\.attn_pre\.fc([12])\.weight$', key)
    if m is None or key in expected or getattr(value, 'ndim', 0) != 2:
        return False
    chs = value.shape[1] if m.group(1) == '1' else value.shape[0]
    return chs >= SE_SKIP_CHS


def remap(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
    """Rename an official SE / ECA / DIANet checkpoint for the model whose state dict is `expected` (meta tensors
    are fine); SE layers that never run in the official network (`_never_runs`) are dropped and reported by
    their official names. A checkpoint in no official layout is returned as it is."""
    kind = official_type(state_dict)
    if kind is None:
        return Remapped(dict(state_dict))
    out: Dict[Any, Any] = {}
    source_names: Dict[str, str] = {}
    dropped: List[str] = []
    for k, v in state_dict.items():
        new = rename_key(k, KEY_RULES[kind])
        if isinstance(new, str):
            if kind == 'se' and _never_runs(new, v, expected):
                dropped.append(k)
                continue
            source_names[new] = k
        out[new] = v
    return Remapped(out, source_names, dropped)


def native_kind(keys: Sequence[str]) -> Optional[str]:
    """'se', 'eca' or 'dianet' for a state dict in this package's layout, from its key names; None if none."""
    text = _text(keys)
    return next((kind for kind, pattern in _NATIVE.items() if pattern.search(text)), None)


class GateRules(KindRules):
    """The rules of one gate family ('se', 'eca', 'dianet')."""
    converts = True
    detect_official = staticmethod(official_type)
    detect_native = staticmethod(native_kind)

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """A checkpoint in this package's layout must hold the family's gate keys (a plain ResNet's would
        leave every gate at its init)."""
        if official_type(state_dict) is None and native_kind(list(state_dict)) != self.kind:
            raise UserError(f"no {self.kind} gate keys in this checkpoint, but '{arch}' is a {self.kind} model")
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return remap(state_dict, expected)

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        state_dict, _ = unwrap_checkpoint(state_dict)
        remapped = remap(state_dict, model.state_dict())
        if remapped.dropped:
            _logger.info(f'dropped official SE layers that never run: {", ".join(remapped.dropped)}')
        return remapped.state_dict


RULES = {kind: GateRules(kind) for kind in KEY_RULES}
