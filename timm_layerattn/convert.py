"""Checkpoints in: safe reading, official KCLA / MRLA / CNNtention layouts, and timm-ResNet trunk warm starts.

* `read_state_dict(path)` reads safetensors or a torch file with `weights_only=True` only, unwraps training
  containers (`state_dict_ema` / `model_ema` / `ema` / `state_dict` / `model`) and strips `module.` /
  `_orig_mod.` prefixes. Anything it cannot read safely is a `UserError` naming the file and the reason.
* `convert_official(state_dict, model_name)` maps a checkpoint saved by the authors' code (bgx666/KCLA,
  joyfang1106/MRLA, AttentionSeekers/CNNtention) to this package's layout and checks it strictly
  against the target architecture: unknown keys, missing keys and shape mismatches are errors naming the
  key; the official modules that never run are dropped with a logged note.
* `load_trunk(model, source)` copies every matching backbone tensor of a timm ResNet checkpoint into a
  layer-attention model and leaves the attention modules at their init.

`timm-layerattn convert --model NAME IN OUT.safetensors` is the command-line form of `convert_official`.
"""
import argparse
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ._utils import UserError, atomic_file, first_line
from .checkpoint_io import non_finite_keys

__all__ = ['read_state_dict', 'unwrap_state_dict', 'convert_official', 'convert_official_with_report',
           'remap_cnntention_keys', 'detect_official_family', 'infer_kcla_head_dim', 'check_state_dict',
           'non_finite_keys', 'check_finite', 'mismatch_parts', 'load_trunk',
           'TrunkLoadResult']

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

# Containers written by training scripts, in the order they are preferred.
_EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
_MODEL_KEYS = ('state_dict', 'model')
# Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------------------------

def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < 100_000_000


def _read_raw(path: Path) -> Tuple[Any, str]:
    """The deserialised object and its format ('safetensors' or 'torch'), never unpickling arbitrary objects."""
    if not path.exists():
        raise UserError(f'checkpoint not found: {path}')
    if not path.is_file():
        raise UserError(f'checkpoint is not a file: {path}')
    with path.open('rb') as f:
        head = f.read(16)
    if not head:
        raise UserError(f'{path}: file is empty')
    if path.suffix == '.safetensors' or _looks_like_safetensors(head):
        import safetensors.torch
        try:
            return safetensors.torch.load_file(str(path), device='cpu'), 'safetensors'
        except Exception as e:
            raise UserError(
                f'{path}: not a readable safetensors file, it may be truncated or corrupt ({first_line(e)})')
    try:
        obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        unsupported = re.search(r'Unsupported global: GLOBAL ([\w.]+)', msg)
        if unsupported:
            raise UserError(
                f'{path}: the checkpoint stores Python objects ({unsupported.group(1)}) that only a full unpickle '
                f'can read, and checkpoints are only ever loaded with weights_only=True. In a session where you '
                f'trust the file, re-save just the weights, e.g. torch.save(ckpt["state_dict"], "weights.pth") '
                f'or safetensors.torch.save_file(...)')
        raise UserError(f'{path}: not a torch checkpoint, or it is corrupt ({first_line(e, "unpickling failed")})')
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise UserError(f'{path}: cannot read the torch checkpoint, it may be truncated or corrupt '
                        f'({type(e).__name__}: {first_line(e, "unexpected end of file")})')
    except Exception as e:  # the weights-only unpickler fails in many ways on data that is not a checkpoint
        raise UserError(f'{path}: not a torch checkpoint, or it is corrupt ({type(e).__name__}: {first_line(e)})')
    return obj, 'torch'


def unwrap_state_dict(obj: Any, prefer_ema: bool = True) -> Tuple[StateDict, str]:
    """Find the state dict inside a training checkpoint; returns it and the container key used ('' if none).

    Also strips `module.` / `_orig_mod.` prefixes. Non-tensor leftovers next to tensors are ignored.
    """
    if not isinstance(obj, Mapping):
        raise UserError(f'checkpoint holds a {type(obj).__name__}, expected a dict of tensors (a state dict)')
    used = []
    order = _EMA_KEYS + _MODEL_KEYS if prefer_ema else _MODEL_KEYS + _EMA_KEYS
    for _ in range(3):  # e.g. {'model': {'state_dict': {...}}}
        # A container key wins even next to stray tensors (e.g. a `best_acc1` tensor in training checkpoints).
        key = next((k for k in order if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if key is None:
            break
        used.append(key)
        obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ', '.join(sorted(map(str, obj.keys()))[:8]) or 'none'
        raise UserError(f'no tensors found in the checkpoint (top-level keys: {keys})')
    out = {}
    for k, v in tensors.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if k.startswith(prefix):
                    k, stripped = k[len(prefix):], True
        out[k] = v
    return out, '.'.join(used)


def read_state_dict(path: PathLike, prefer_ema: bool = True) -> Tuple[StateDict, str]:
    """Read a checkpoint file safely and return `(state_dict, container_key)`; see `unwrap_state_dict`."""
    obj, _ = _read_raw(Path(path))
    return unwrap_state_dict(obj, prefer_ema=prefer_ema)


def mismatch_parts(
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, Any],
        source_names: Optional[Mapping[str, str]] = None,
        kinds: Tuple[str, ...] = ('unexpected', 'missing', 'shape'),
) -> List[str]:
    """How `state_dict` does not fit `expected` (a model state dict, meta is fine), one phrase per kind.

    Each phrase names a few keys and counts the rest; `source_names` maps converted keys back to the
    checkpoint's own names. `kinds` selects which of unexpected keys, missing keys and shape mismatches count.
    """
    src = source_names or {}

    def name(k: str) -> str:
        return f'{src[k]} (-> {k})' if k in src and src[k] != k else k

    def some(items: List[str]) -> str:
        return ', '.join(items[:3]) + (f', ... ({len(items) - 3} more)' if len(items) > 3 else '')

    parts = []
    unexpected = [k for k in state_dict if k not in expected]
    if 'unexpected' in kinds and unexpected:
        parts.append(f'{len(unexpected)} unexpected key(s): ' + some([name(k) for k in unexpected]))
    missing = [k for k in expected if k not in state_dict]
    if 'missing' in kinds and missing:
        parts.append(f'{len(missing)} missing key(s): ' + some(missing))
    mismatched = [k for k in state_dict if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if 'shape' in kinds and mismatched:
        parts.append(f'{len(mismatched)} shape mismatch(es): ' + some(
            [f'{name(k)} checkpoint {list(state_dict[k].shape)} vs model {list(expected[k].shape)}' for k in mismatched]))
    return parts


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        expected: Mapping[str, Any],
        what: str = 'the model',
        source_names: Optional[Mapping[str, str]] = None,
) -> None:
    """Raise one `UserError` line if `state_dict` does not fit `expected` (see `mismatch_parts`)."""
    parts = mismatch_parts(state_dict, expected, source_names)
    if parts:
        raise UserError(f'checkpoint does not fit {what}: ' + '; '.join(parts))


def check_finite(state_dict: Mapping[str, Any], what: str = 'the checkpoint') -> None:
    """Raise one `UserError` line naming the tensors of `state_dict` that hold NaN / inf values.

    Such weights load without complaint and give NaN outputs (and NaN != NaN breaks every equality
    check after them), so they are refused where they enter.
    """
    bad = non_finite_keys(state_dict)
    if bad:
        more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
        raise UserError(f'{what} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): '
                        f'{", ".join(bad[:3])}{more}')


# ---------------------------------------------------------------------------------------------------------------
# Official layouts
# ---------------------------------------------------------------------------------------------------------------

_CNNTENTION_OFFICIAL = re.compile(
    r'^att\d\.(weights$|query\.|key\.|value\.|val\.|linear\.|channel_attention\.|spatial_attention\.)')

# CNNtention (AttentionSeekers/CNNtention) module names -> ours, per variant (`cnntention.md` §6). The MHA module
# computes `key^T @ query` with the softmax over the `query` axis: its `key` conv makes the queries and its
# `query` conv the keys, so the two swap places.
_CNNTENTION_RULES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    'selfatt': (('weights', 'gamma'), ('query', 'q'), ('key', 'k'), ('value', 'v')),
    'mha': (('weights', 'gamma'), ('key', 'q'), ('query', 'k'), ('val', 'v'), ('linear', 'proj')),
    'cbam': (('channel_attention.mlp.0', 'channel_mlp.fc1'), ('channel_attention.mlp.2', 'channel_mlp.fc2'),
             ('spatial_attention.conv', 'spatial_conv')),
}


def detect_official_family(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Which official code wrote `state_dict`: 'kcla', 'mrla_light', 'mrla_base', 'dla', 'cnntention' or None.

    None means the keys are in this package's (= timm / torchvision) layout, which is also the layout of
    the official plain CIFAR ResNets.
    """
    keys = list(state_dict)
    if any('.lstm.' in k for k in keys):
        return 'dla'
    if any(k.endswith('.head_att.weight') for k in keys):
        return 'kcla'
    if any(k.endswith('.mrla.lambda_t') for k in keys):
        return 'mrla_light'
    if any('.mrla.mrla.Wq.' in k for k in keys):
        return 'mrla_base'
    if any(_CNNTENTION_OFFICIAL.match(k) for k in keys):
        return 'cnntention'
    return None


def remap_cnntention_keys(state_dict: Mapping[str, torch.Tensor], variant: str) -> StateDict:
    """Rename CNNtention attention keys (`att{i}.*`, the module after stage i) to this package's names
    (`layer{i}.attn.*`, the stage's exit unit); trunk keys are unchanged.

    Args:
        variant: 'selfatt', 'mha' or 'cbam'.
    """
    if variant not in _CNNTENTION_RULES:
        raise ValueError(f'unknown CNNtention variant {variant!r}, expected one of {sorted(_CNNTENTION_RULES)}')
    rules = _CNNTENTION_RULES[variant]
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^att(\d)\.(.+)$', k)
        if m:
            rest = m.group(2)
            for old, new in rules:
                if rest == old or rest.startswith(old + '.'):
                    rest = new + rest[len(old):]
                    break
            k = f'layer{m.group(1)}.attn.{rest}'
        out[k] = v
    return out


def _cnntention_variant_from_keys(state_dict: Mapping[str, Any]) -> Optional[str]:
    keys = [k for k in state_dict if k.startswith('att')]
    if any('.channel_attention.' in k for k in keys):
        return 'cbam'
    if any('.linear.' in k or '.val.' in k for k in keys):
        return 'mha'
    if any('.query.' in k for k in keys):
        return 'selfatt'
    return None


def _kcla_heads(state_dict: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """(heads, channels) of the first KCLA cell, official (`Wv`) or this package's (`attn.v`) layout."""
    for k, v in state_dict.items():
        if k.endswith('.norm_d'):
            prefix = k[:-len('norm_d')]
            value = state_dict.get(prefix + 'Wv.weight', state_dict.get(prefix + 'v.weight'))
            if value is not None:
                return v.numel(), value.shape[0]
    return None


def infer_kcla_head_dim(state_dict: Mapping[str, Any]) -> Optional[int]:
    """Head dim of a KCLA checkpoint (from `norm_d`'s number of heads), None for other checkpoints."""
    found = _kcla_heads(state_dict)
    return found[1] // found[0] if found else None


@dataclass
class ConversionReport:
    """What `convert_official` did: detected family, KCLA head dim, dropped (never-used) official keys."""
    family: Optional[str]
    model_name: str
    head_dim: Optional[int] = None
    dropped: List[str] = field(default_factory=list)
    filled: List[str] = field(default_factory=list)
    num_tensors: int = 0

    def summary(self) -> str:
        text = f"{self.num_tensors} tensors for '{self.model_name}' from a {self.family or 'timm-layout'} checkpoint"
        if self.head_dim:
            text += f' (KCLA head_dim {self.head_dim})'
        if self.dropped:
            text += f'; dropped {len(self.dropped)} official parameter(s) that never run: ' + ', '.join(self.dropped)
        if self.filled:
            text += f'; added {len(self.filled)} missing BatchNorm counter(s)'
        return text


def _target(model_name: str, num_classes: Optional[int], in_chans: Optional[int], head_dim: Optional[int]):
    """The target model on the meta device (no memory, no compute) and its layer-attention type."""
    import timm
    from timm.models import is_model, split_model_name_tag
    from . import models  # noqa: F401  (registers the architectures)
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    kwargs = {k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans, head_dim=head_dim).items()
              if v is not None}
    try:
        model = timm.create_model(arch, device='meta', **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f'cannot build {arch} with {kwargs}: {e}') from None
    cfg = getattr(model, 'cfg', None)
    attn = getattr(cfg, 'attn', None)
    if re.match(r'^cifar_resnet20_basic_(selfatt|mha|cbam)$', arch):
        family = 'cnntention'
    elif cfg is not None and hasattr(cfg, 'layers'):
        family = attn.type if attn is not None else 'plain'
    else:
        family = 'other'
    return arch, model, family


def _suggest_arch(family: str, layers: Tuple[int, ...], stem_type: str) -> Optional[str]:
    from .models import cifar_resnet_la, resnet_la
    for module in (resnet_la, cifar_resnet_la):
        for name, cfg in module.model_cfgs.items():
            attn = cfg.attn.type if cfg.attn is not None else 'plain'
            if attn == family and tuple(cfg.layers) == layers and cfg.stem_type == stem_type:
                return name
    return None


def _blocks_per_stage(keys) -> Tuple[int, ...]:
    blocks: Dict[int, set] = {}
    for k in keys:
        m = re.match(r'^layer(\d+)\.(\d+)\.', k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def convert_official_with_report(
        state_dict: Mapping[str, Any],
        model_name: str,
        *,
        head_dim: Optional[int] = None,
) -> Tuple[StateDict, ConversionReport]:
    """`convert_official`, also returning a `ConversionReport`."""
    from .layers.kcla import kcla_temperatures
    from .models.resnet_la import remap_official_keys
    sd, _ = unwrap_state_dict(state_dict)
    family = detect_official_family(sd)
    if family == 'dla':
        raise UserError('this is a DLA (dynamic layer attention) checkpoint; DLA models are not part of timm_layerattn')

    fc_w = sd.get('fc.weight')
    num_classes = fc_w.shape[0] if fc_w is not None and fc_w.ndim == 2 else None
    stem_w = sd.get('conv1.weight', sd.get('conv1.0.weight'))
    in_chans = stem_w.shape[1] if stem_w is not None and stem_w.ndim == 4 else None
    inferred_head_dim = None
    if family == 'kcla':
        found = _kcla_heads(sd)
        if found is None:
            raise UserError('KCLA checkpoint without norm_d / Wv.weight: cannot infer its head dim')
        groups, channels = found
        inferred_head_dim = channels // groups
    arch, model, target_family = _target(model_name, num_classes, in_chans, head_dim)
    if family is not None and family != target_family:
        raise UserError(f"this is an official {family} checkpoint, but '{arch}' is a {target_family} model")
    if family is None and target_family not in ('plain', 'cnntention', 'other'):
        if not any('.attn.' in k for k in sd):
            raise UserError(f"no layer-attention keys in this checkpoint, but '{arch}' is a {target_family} model")
        _logger.info('checkpoint is already in the timm_layerattn layout; checking it only')
    cfg = getattr(model, 'cfg', None)
    if family == 'kcla':
        model_head_dim = cfg.attn.head_dim
        if inferred_head_dim != model_head_dim:
            raise UserError(
                f"the checkpoint's KCLA head dim is {inferred_head_dim} (norm_d has {groups} heads for {channels} "
                f"channels) but '{arch}' is built with head_dim={model_head_dim}; use head_dim={inferred_head_dim}: "
                f"timm.create_model('{arch}', head_dim={inferred_head_dim}), convert_official(..., "
                f"head_dim={inferred_head_dim}) or `--head-dim {inferred_head_dim}`")
    if family == 'mrla_base' and stem_w is not None and stem_w.ndim == 4 and stem_w.shape[-1] == 7:
        raise UserError(
            "this MRLA-B checkpoint has a 7x7 stem: it comes from the official resnet_mrla_base22.py variant "
            "(7x7 stem, no ReLU after the attention BatchNorm), which timm_layerattn does not implement; "
            f"'{arch}' follows the official resnet_mrla_base.py (deep 3x3 stem)")

    # Rename
    source_names: Dict[str, str] = {}
    if family in ('kcla', 'mrla_light', 'mrla_base'):
        renamed = remap_official_keys(sd)
        source_names = dict(zip(renamed.keys(), sd.keys()))
    elif family == 'cnntention':
        variant = _cnntention_variant_from_keys(sd)
        target_variant = arch.rsplit('_', 1)[-1]
        if variant != target_variant:
            raise UserError(f"this is a CNNtention {variant} checkpoint, but '{arch}' is the {target_variant} model")
        renamed = remap_cnntention_keys(sd, variant)
        source_names = dict(zip(renamed.keys(), sd.keys()))
    else:
        renamed = dict(sd)

    expected = model.state_dict()
    layers = _blocks_per_stage(renamed)
    if cfg is not None and hasattr(cfg, 'layers') and layers and layers != tuple(cfg.layers):
        hint = _suggest_arch(target_family, layers, cfg.stem_type)
        raise UserError(
            f"the checkpoint has {'-'.join(map(str, layers))} blocks per stage but '{arch}' has "
            f"{'-'.join(map(str, cfg.layers))}" + (f"; use '{hint}'" if hint else ''))

    report = ConversionReport(family=family, model_name=arch, head_dim=inferred_head_dim)
    out: StateDict = {}
    first_block = 'layer1.0'
    for k, v in renamed.items():
        if k not in expected and family == 'kcla':
            m = re.match(r'^(layer\d+\.\d+)\.attn\.(hist_proj|hist_k|hist_norm)\.', k)
            # Known-unused official modules (layer_attention.md Q3 / §9): all three re-init extras of the network's
            # first cell (it never receives a history), and the adjust conv of a re-init cell whose width does
            # not change (e.g. block 11 of ResNet-101's layer3).
            if m and (m.group(1) == first_block or
                      (m.group(2) == 'hist_proj' and f'{m.group(1)}.attn.hist_k.weight' in expected)):
                report.dropped.append(source_names.get(k, k))
                continue
        if k.endswith('.attn.norm_d') and k in expected:
            v = v.reshape(-1)
            ref = kcla_temperatures(v.numel())
            if v.shape == ref.shape and not torch.allclose(v.float(), ref, rtol=1e-6, atol=0.):
                raise UserError(f'{source_names.get(k, k)} holds values that differ from the fixed KCLA temperatures '
                                f'(1 / log-uniform [0.7, 1/0.7]); this is not a checkpoint of the official KCLA code')
        out[k] = v
    for k in expected:
        if k not in out and k.endswith('.num_batches_tracked'):
            out[k] = torch.zeros((), dtype=torch.long)
            report.filled.append(k)
    check_state_dict(out, expected, what=f"'{arch}'", source_names=source_names)
    out = {k: out[k] for k in expected}
    report.num_tensors = len(out)
    if report.dropped:
        _logger.info(f'convert_official: dropped official parameters that never run: {", ".join(report.dropped)}')
    return out, report


def convert_official(
        state_dict: Mapping[str, Any],
        model_name: str,
        *,
        head_dim: Optional[int] = None,
) -> StateDict:
    """Map a checkpoint of the official KCLA / MRLA / CNNtention code to `model_name`'s state dict.

    Accepts a plain state dict or a training-script checkpoint (`state_dict` nesting, `module.` prefixes).
    Strict: the official modules that never run (KCLA's unused re-init parts) are dropped with a logged note;
    any other key the model lacks, any key it needs that is missing and any shape mismatch raise a
    `UserError` naming the key. A KCLA checkpoint's head dim is read from `norm_d`; a model built with
    another head dim is refused with the value to use (`head_dim=` builds the target with it).

    Args:
        state_dict: The official checkpoint (or its `state_dict`).
        model_name: Target architecture, e.g. 'resnet50_kcla' or 'cifar_resnet56_mrlal'.
        head_dim: KCLA head dim of the target model, when it differs from the registered default.

    Returns:
        A state dict that `timm.create_model(model_name, ...)` loads with `strict=True`.
    """
    return convert_official_with_report(state_dict, model_name, head_dim=head_dim)[0]


# ---------------------------------------------------------------------------------------------------------------
# Trunk warm start
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrunkLoadResult:
    """Outcome of `load_trunk`: which model tensors were loaded, which stay at init, which source keys were unused."""
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # model keys left at their init
    skipped: Dict[str, str] = field(default_factory=dict)  # source key -> reason

    def summary(self) -> str:
        attn = sum(_is_attention_key(k) for k in self.missing)
        reasons: Dict[str, int] = {}
        for r in self.skipped.values():
            reasons[r] = reasons.get(r, 0) + 1
        skipped = ', '.join(f'{n} {r}' for r, n in sorted(reasons.items())) or 'none'
        return (f'loaded {len(self.loaded)} tensors; left {len(self.missing)} at init ({attn} attention, '
                f'{len(self.missing) - attn} other); skipped source tensors: {skipped}')


def _is_attention_key(key: str) -> bool:
    return '.attn.' in key or '.attn_in.' in key or key.startswith('as_proj.')


def load_trunk(
        model: nn.Module,
        source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
        *,
        load_classifier: bool = True,
) -> TrunkLoadResult:
    """Initialise a layer-attention model's backbone from a timm (or torchvision) ResNet checkpoint.

    Every source tensor whose name and shape match a non-attention tensor of `model` is copied; the
    attention modules keep their initialisation. The practical way to fine-tune these models from
    ImageNet weights while no layer-attention weights are published.

    Args:
        model: The model to initialise in place.
        source: A timm model name with pretrained tag ('resnet50.a1_in1k', downloaded through timm), a
            checkpoint file (safetensors / torch, read with weights_only=True) or a state dict.
        load_classifier: Also copy the classifier when its shape matches (same number of classes).

    Returns:
        A `TrunkLoadResult`; its `summary()` is also logged.
    """
    if isinstance(source, Mapping):
        src, _ = unwrap_state_dict(source)
        origin = 'state dict'
    elif Path(source).exists():
        src, _ = read_state_dict(source)
        origin = str(source)
    else:
        import timm
        name = str(source)
        if not timm.is_model(name):
            raise UserError(f'load_trunk: {name!r} is neither a file nor a timm model name')
        try:
            src = timm.create_model(name, pretrained=True).state_dict()
        except Exception as e:
            raise UserError(f'load_trunk: cannot load pretrained {name!r} ({type(e).__name__}: {e})') from None
        origin = name
    classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or 'fc'
    target = model.state_dict()
    result = TrunkLoadResult()
    to_load = {}
    for k, v in src.items():
        if k not in target:
            result.skipped[k] = 'not in model'
        elif _is_attention_key(k):
            result.skipped[k] = 'attention (kept at init)'
        elif not load_classifier and k.startswith(classifier + '.'):
            result.skipped[k] = 'classifier'
        elif tuple(v.shape) != tuple(target[k].shape):
            result.skipped[k] = 'shape mismatch'
        else:
            to_load[k] = v
    incompatible = model.load_state_dict(to_load, strict=False)
    assert not incompatible.unexpected_keys
    result.loaded = [k for k in target if k in to_load]
    result.missing = [k for k in target if k not in to_load]
    _logger.info(f'load_trunk from {origin}: {result.summary()}')
    return result


# ---------------------------------------------------------------------------------------------------------------
# CLI: timm-layerattn convert
# ---------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ._utils import int_arg
    parser.description = ('Convert a checkpoint of the official KCLA / MRLA / CNNtention code to this package\'s '
                          'layout (safetensors), checked strictly against the target architecture.')
    parser.add_argument('input', help='official checkpoint (torch file read with weights_only=True, or safetensors)')
    parser.add_argument('output', help='output .safetensors file')
    parser.add_argument('--model', required=True, help='target architecture, e.g. resnet50_kcla')
    parser.add_argument('--head-dim', type=int_arg(min=1), default=None,
                        help='KCLA head dim of the target (the official ImageNet code defaults to 64)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')


def run(args: argparse.Namespace) -> int:
    import safetensors.torch
    out = Path(args.output)
    if out.suffix != '.safetensors':
        raise UserError(f'output must be a .safetensors file, got {out}')
    if out.is_dir():
        raise UserError(f'output {out} is a folder; give the path of a .safetensors file')
    if os.path.lexists(out) and not args.overwrite:
        raise UserError(f'output file already exists: {out} (remove it or pass --overwrite)')
    if os.path.lexists(out) and not out.is_file():
        raise UserError(f'output {out} exists and is not a regular file; it is never replaced')
    from ._utils import check_writable
    check_writable(out.parent, 'output folder')
    state_dict, container = read_state_dict(args.input, prefer_ema=False)
    check_finite(state_dict, f'checkpoint {args.input}')
    converted, report = convert_official_with_report(state_dict, args.model, head_dim=args.head_dim)
    tensors = {k: v.contiguous() for k, v in converted.items()}
    with atomic_file(out) as f:
        f.write(safetensors.torch.save(tensors, metadata={'format': 'pt', 'architecture': report.model_name}))
    print(f'converted {report.summary()}')
    kwargs = f', head_dim={args.head_dim}' if args.head_dim else ''
    print(f"wrote {out}; load it with timm.create_model('{report.model_name}', pretrained=True{kwargs}, "
          f"pretrained_cfg_overlay=dict(file='{out}'))")
    return 0
