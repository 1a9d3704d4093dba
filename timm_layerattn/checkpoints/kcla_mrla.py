"""Checkpoint rules of the layer-attention family (KCLA, MRLA-light, MRLA-base; ImageNet and CIFAR depths).

The official code (bgx666/KCLA, joyfang1106/MRLA) names modules differently from this package: KCLA's
ImageNet stages keep trunk blocks and attention cells in parallel containers (`layerS.layers.i` /
`layerS.attention.i`), the CIFAR code and MRLA-base number stages from 0 (`stages.s.i`), the attention
module is `kcla` / `mrla` with `W{q,k,v}` projections, and KCLA's `norm_d` is stored as a 5-D tensor.
The trunk keys are otherwise timm's / torchvision's. The key tables are in
docs/design/layer_attention.md#la-conversion.

`remap` is the one place that renames an official checkpoint and drops KCLA's official modules that never run
(#la-unused-modules); timm's entry points (`filter_checkpoint`) and `convert_official` both use it. The
family-specific refusals of `convert_official` (a KCLA head dim that does not fit, MRLA-B's 7x7-stem variant)
and the head-dim hints live in the rules objects of `RULES`.
"""
import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from ..layers.kcla import kcla_temperatures
from .io import unwrap_checkpoint
from .match import layer_attn
from .rules import CheckpointRules, Remapped, rename_key

__all__ = [
    'KEY_RULES', 'UNUSED', 'is_official', 'official_type', 'remap_keys', 'remap', 'never_runs', 'kcla_heads',
    'infer_head_dim', 'native_kind', 'filter_checkpoint', 'LayerAttnRules', 'KclaRules', 'MrlaBaseRules',
    'RULES', 'TRUNK_RULES',
]

_logger = logging.getLogger(__name__)

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
# The history re-init modules of a KCLA cell (renamed): cell, module. Some exist in official checkpoints but
# never run (`never_runs`).
UNUSED = re.compile(r'^(layer\d+\.\d+)\.attn\.(hist_proj|hist_k|hist_norm)\.')
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
    `mrla.Wq`), so a trunk-only checkpoint is None. The official DeiT-MRLA layout (`blocks.i.mrla.`) is the
    DeiT families' (`checkpoints/deit_mrla.py`).
    """
    keys = [k for k in state_dict if isinstance(k, str) and not k.startswith('blocks.')]
    if any(k.endswith('.head_att.weight') for k in keys):
        return 'kcla'
    if any(k.endswith('.mrla.lambda_t') for k in keys):
        return 'mrla_light'
    if any('.mrla.mrla.Wq.' in k for k in keys):
        return 'mrla_base'
    return None


def remap_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename official KCLA / MRLA keys to this package's layout (values and order unchanged)."""
    return {rename_key(k, KEY_RULES): v for k, v in state_dict.items()}


def _first_cell(keys: Sequence[Any]) -> Optional[str]:
    """The network's first cell (`layerS.i` with the lowest stage and index) among renamed attention keys."""
    cells = [(int(m.group(1)), int(m.group(2))) for k in keys if isinstance(k, str)
             for m in [re.match(r'^layer(\d+)\.(\d+)\.attn\.', k)] if m]
    return 'layer{}.{}'.format(*min(cells)) if cells else None


def never_runs(key: str, expected: Mapping[str, Any], first_cell: Optional[str]) -> bool:
    """True for a renamed official key of a KCLA module that exists in the official code but never runs, and
    that the model (`expected`, its state dict) therefore lacks (docs/design/layer_attention.md#la-unused-modules):

    * all three re-init extras (`hist_proj`, `hist_k`, `hist_norm`) of the network's first cell `first_cell`,
      which never receives a history;
    * the history projection `hist_proj` of a re-init cell whose width does not change (the model has the
      cell's `hist_k` but no `hist_proj`; e.g. block 11 of ResNet-101's layer3).

    Any other re-init module the model lacks runs in the official network: the architectures differ, and the
    key stays (the strict check names it).
    """
    m = UNUSED.match(key)
    if m is None or key in expected:
        return False
    cell, module = m.groups()
    return cell == first_cell or (module == 'hist_proj' and f'{cell}.attn.hist_k.weight' in expected)


def remap(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
    """Rename an official KCLA / MRLA checkpoint for the model whose state dict is `expected` (meta tensors
    are fine): keys renamed (`remap_keys`), `norm_d` reshaped to its 1-D buffer form, and the official modules
    that never run (`never_runs`) dropped and reported by their official names."""
    renamed = [rename_key(k, KEY_RULES) for k in state_dict]
    first = _first_cell(renamed)
    out: Dict[Any, Any] = {}
    source_names: Dict[str, str] = {}
    dropped: List[str] = []
    for new, (k, v) in zip(renamed, state_dict.items()):
        if isinstance(new, str):
            if never_runs(new, expected, first):
                dropped.append(k)
                continue
            if new.endswith('.attn.norm_d'):
                v = v.reshape(-1)
            source_names[new] = k
        out[new] = v
    return Remapped(out, source_names, dropped)


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
    layout passes through unchanged. An official KCLA / MRLA checkpoint goes through `remap` (as in
    `convert_official`): renamed, `norm_d` reshaped to its 1-D buffer form, the official modules that never
    run dropped.
    """
    state_dict, _ = unwrap_checkpoint(state_dict)
    if not is_official(state_dict):
        return state_dict
    return remap(state_dict, model.state_dict()).state_dict


class LayerAttnRules(CheckpointRules):
    """The rules of one layer-attention type ('kcla', 'mrla_light', 'mrla_base'); `kind=None`: the plain
    trunk of the same official code (its CIFAR ResNets, whose stages are named `stages.s.i`)."""
    converts = True

    def __init__(self, kind: Optional[str] = None):
        self.kind = kind

    def official_type(self, state_dict: Mapping[str, Any]) -> Optional[str]:
        found = official_type(state_dict)
        return found if found is not None and found == self.kind else None

    def native_kind(self, keys: Sequence[str]) -> Optional[str]:
        found = native_kind(keys)
        return found if found is not None and found == self.kind else None

    def check_source(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """A checkpoint in this package's layout must hold layer-attention keys; an official one is checked by
        `check_official`."""
        if self.kind is None:
            return {}
        if official_type(state_dict) is None:
            if not any(isinstance(k, str) and '.attn.' in k for k in state_dict):
                raise UserError(f"no layer-attention keys in this checkpoint, but '{arch}' is a {self.kind} model")
            _logger.info('checkpoint is already in the timm_layerattn layout; checking it only')
            return {}
        return self.check_official(state_dict, arch, cfg)

    def check_official(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        """`check_source` of a checkpoint in the type's official layout."""
        return {}

    def remap(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Remapped:
        return remap(state_dict, expected)

    def filter(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        return filter_checkpoint(state_dict, model)


class KclaRules(LayerAttnRules):
    """KCLA: the head dim is read from `norm_d` (official files must match the model's), and `norm_d` holds
    fixed temperatures (docs/design/layer_attention.md#la-norm-d-buffer)."""

    def check_official(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        found = kcla_heads(state_dict)
        if found is None:
            raise UserError('KCLA checkpoint without norm_d / Wv.weight: cannot infer its head dim')
        groups, channels = found
        head_dim = channels // groups
        model_head_dim = layer_attn(cfg).head_dim
        if head_dim != model_head_dim:
            raise UserError(
                f"the checkpoint's KCLA head dim is {head_dim} (norm_d has {groups} heads for {channels} "
                f"channels) but '{arch}' is built with head_dim={model_head_dim}; use head_dim={head_dim}: "
                f"timm.create_model('{arch}', head_dim={head_dim}), convert_official(..., "
                f"head_dim={head_dim}) or `--head-dim {head_dim}`")
        return {'head_dim': head_dim}

    def validate(self, state_dict: Mapping[str, Any], expected: Mapping[str, Any],
                 source_names: Mapping[str, str]) -> None:
        for k, v in state_dict.items():
            if isinstance(k, str) and k.endswith('.attn.norm_d') and k in expected:
                v = v.reshape(-1)
                ref = kcla_temperatures(v.numel())
                if v.shape == ref.shape and not torch.allclose(v.float(), ref, rtol=1e-6, atol=0.):
                    raise UserError(
                        f'{source_names.get(k, k)} holds values that differ from the fixed KCLA temperatures '
                        f'(1 / log-uniform [0.7, 1/0.7]); this is not a checkpoint of the official KCLA code')

    def model_kwargs(self, state_dict: Mapping[str, Any], cfg: Any) -> Tuple[Dict[str, Any], str]:
        """`head_dim` read from `norm_d` when it is not the architecture's (e.g. the released ImageNet KCLA
        code's 64)."""
        head_dim = infer_head_dim(state_dict)
        attn = layer_attn(cfg)
        if head_dim is None or attn is None or head_dim == getattr(attn, 'head_dim', None):
            return {}, ''
        return {'head_dim': head_dim}, f' (KCLA head_dim {head_dim}, read from norm_d)'

    def hints(self, state_dict: Mapping[str, Any], cfg: Any, *, mismatched: Sequence[str] = (),
              backbone: bool = False) -> List[str]:
        """The head dim to build the model with, when the checkpoint's differs."""
        if backbone:
            if not any(k.endswith('.norm_d') for k in mismatched):
                return []
            head_dim = infer_head_dim(state_dict)
            if head_dim in (None, 64):
                return ["KCLA head dim differs: the official ImageNet code uses 64, set the backbone's head_dim=64"]
            return [f"KCLA head dim differs: the checkpoint's is {head_dim}, set the backbone's head_dim={head_dim}"]
        if self.native_kind(list(state_dict)) is None:
            return []
        attn = layer_attn(cfg)
        head_dim = infer_head_dim(state_dict)
        if head_dim and attn is not None and getattr(attn, 'head_dim', head_dim) != head_dim:
            return [f"the checkpoint's KCLA head dim is {head_dim}, the model's {attn.head_dim}: pass "
                    f"head_dim={head_dim} to timm.create_model"]
        return []


class MrlaBaseRules(LayerAttnRules):
    """MRLA-base: the official `resnet_mrla_base22.py` variant (7x7 stem) is refused
    (docs/design/layer_attention.md#la-mrla-base-variants)."""

    def check_official(self, state_dict: Mapping[str, Any], arch: str, cfg: Any) -> Dict[str, Any]:
        stem_w = state_dict.get('conv1.weight', state_dict.get('conv1.0.weight'))
        if stem_w is not None and getattr(stem_w, 'ndim', 0) == 4 and stem_w.shape[-1] == 7:
            raise UserError(
                "this MRLA-B checkpoint has a 7x7 stem: it comes from the official resnet_mrla_base22.py variant "
                "(7x7 stem, no ReLU after the attention BatchNorm), which timm_layerattn does not implement; "
                f"'{arch}' follows the official resnet_mrla_base.py (deep 3x3 stem)")
        return {}


# The rules of each layer-attention type, by `LayerAttnCfg.type` (= family name).
RULES = {'kcla': KclaRules('kcla'), 'mrla_light': LayerAttnRules('mrla_light'),
         'mrla_base': MrlaBaseRules('mrla_base')}
TRUNK_RULES = LayerAttnRules()
