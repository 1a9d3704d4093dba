"""Where an export's weights come from: any checkpoint file a user has, read safely, and a model built from it.

`read_checkpoint` takes the weights out of safetensors files, state dicts, training checkpoints (timm's
train.py, `timm-layerattn train`, other scripts; raw or EMA weights) and MMDetection checkpoints (the backbone
part), always with `weights_only=True`; `load_model_from_checkpoint` builds the architecture to fit them
(classes and input channels read from the weights, official KCLA / MRLA / CNNtention layouts converted) and
loads them strictly. `timm-layerattn export` and `timm_layerattn.hub` use them.
"""
import argparse
import os
from typing import Any, ContextManager, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .._utils.errors import UserError
from ..checkpoints.io import EMA_KEYS, MODEL_KEYS
from .card import model_family

__all__ = ['read_checkpoint', 'load_model_from_checkpoint']

PathLike = Union[str, os.PathLike]

# Training checkpoints of timm's train.py store its `argparse.Namespace`; nothing else is allow-listed (besides the
# mmengine Runner's message hub, see `_read_raw`).
_ALLOWED_GLOBALS = (argparse.Namespace,)
# A detector's state dict (MMDetection) keeps the backbone under this prefix.
_BACKBONE_PREFIX = 'backbone.'
# `timm_layerattn.det.LayerAttnResNet` keeps the timm model under `model.`.
_DET_TRUNK_PREFIX = 'model.'


def _mmengine_globals() -> Optional[ContextManager[None]]:
    """The allow-list of mmengine Runner checkpoints (`timm_layerattn.det.checkpoint`), or None where MMDetection
    is not installed (`timm_layerattn.det` needs it; the reader's error then names what to install)."""
    import importlib.util
    if importlib.util.find_spec('mmengine') is None:
        return None
    try:
        from ..det.checkpoint import mmengine_checkpoint_globals
    except ImportError:  # mmengine without MMDetection / mmcv: timm_layerattn.det does not import
        return None
    return mmengine_checkpoint_globals()


def _read_raw(checkpoint: PathLike) -> Tuple[Any, str]:
    """`read_raw` with the export's allow-list; an mmengine Runner checkpoint is read again with its own."""
    from ..checkpoints.io import UnsupportedGlobalError, read_raw
    try:
        return read_raw(checkpoint, allowed_globals=_ALLOWED_GLOBALS)
    except UnsupportedGlobalError as e:
        scope = _mmengine_globals() if e.global_name.startswith('mmengine.') else None
        if scope is None:
            raise
    with scope:  # only for these files: importing MMDetection takes seconds
        return read_raw(checkpoint, allowed_globals=_ALLOWED_GLOBALS)


def _describe(obj: Any, fmt: str) -> str:
    """What kind of file a checkpoint is, with its article, for the 'loaded ...' line."""
    if fmt == 'safetensors':
        return 'a safetensors file'
    if not isinstance(obj, Mapping):
        return 'a torch file'
    args, meta = obj.get('args'), obj.get('meta')
    if isinstance(args, argparse.Namespace):
        kind = 'a timm train.py checkpoint'
    elif isinstance(args, Mapping) and 'state_dict' in obj:
        kind = 'a timm-layerattn train checkpoint'
    elif isinstance(meta, Mapping) and 'state_dict' in obj:
        kind = 'an MMDetection / mmengine checkpoint'
    elif any(isinstance(obj.get(k), Mapping) for k in EMA_KEYS + MODEL_KEYS):
        kind = 'a training checkpoint'
    else:
        return 'a state dict'
    epoch = obj.get('epoch', meta.get('epoch') if isinstance(meta, Mapping) else None)
    return kind + (f', epoch {epoch}' if isinstance(epoch, int) and not isinstance(epoch, bool) else '')


def _detector_backbone(state_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The `backbone.` part of a detector's state dict, prefixes stripped; None for any other state dict."""
    from ..checkpoints.io import select_prefix, strip_shared_prefix
    part = select_prefix(state_dict, _BACKBONE_PREFIX)
    return strip_shared_prefix(part, _DET_TRUNK_PREFIX) if part else None


def _check_arch(obj: Any, model_name: Optional[str], checkpoint: PathLike) -> None:
    """Refuse a training checkpoint whose `arch` entry names another registered architecture."""
    from timm.models import is_model, split_model_name_tag
    saved = obj.get('arch') if isinstance(obj, Mapping) else None
    if not model_name or not isinstance(saved, str) or not saved:
        return
    saved_arch, arch = split_model_name_tag(saved)[0], split_model_name_tag(model_name)[0]
    if is_model(saved_arch) and saved_arch != arch:  # 'hf-hub:...' and unknown names are not compared
        raise UserError(f"{checkpoint} is a checkpoint of '{saved_arch}' (its 'arch' entry), not of '{arch}'")


def read_checkpoint(
        checkpoint: PathLike,
        use_ema: bool = False,
        model_name: Optional[str] = None,
) -> Tuple[Dict[str, torch.Tensor], str, bool]:
    """The weights in any checkpoint file a user has, read with `weights_only=True`, and what was taken.

    Accepts safetensors and plain state dicts; training checkpoints of timm's train.py (its `args` Namespace is
    allow-listed, nothing else), of `timm-layerattn train` and of other scripts (`state_dict` / `model`, EMA
    in `state_dict_ema` / `model_ema` / `ema`); MMDetection checkpoints (the `backbone.` part; an mmengine
    Runner's message hub is read where MMDetection is installed).

    Args:
        use_ema: Take the EMA weights; an error when there are none. Default: the raw weights, as timm's
            validate.py does without `--use-ema`.
        model_name: The architecture the weights are for: a training checkpoint whose `arch` entry names
            another registered one is refused.

    Returns:
        `(state_dict, note, is_backbone)`: the tensors, a description ("'state_dict' of a timm train.py
        checkpoint, epoch 9: PATH"), and whether they are a detector's backbone (no classifier).
    """
    from ..checkpoints.io import unwrap_state_dict
    obj, fmt = _read_raw(checkpoint)
    _check_arch(obj, model_name, checkpoint)
    try:
        state_dict, container = unwrap_state_dict(obj, prefer_ema=use_ema)
    except UserError as e:
        raise UserError(f'{checkpoint}: {e}') from None
    has_ema = isinstance(obj, Mapping) and any(isinstance(obj.get(k), Mapping) and obj.get(k) for k in EMA_KEYS)
    if use_ema and not set(container.split('.')) & set(EMA_KEYS):
        keys = ', '.join(sorted(map(str, obj))[:8]) if isinstance(obj, Mapping) else ''
        raise UserError(f'{checkpoint}: --use-ema, but it holds no EMA weights ({" / ".join(EMA_KEYS)})'
                        + (f'; its keys: {keys}' if keys else ''))
    note = _describe(obj, fmt)
    if container:
        note = f"'{container}' of {note}"
    if has_ema and not use_ema:
        note += ' (it also holds EMA weights: --use-ema takes those)'
    backbone = _detector_backbone(state_dict)
    if backbone is not None:
        state_dict = backbone
        note += f', its {_BACKBONE_PREFIX!r} part ({len(backbone)} tensors)'
    return state_dict, f'{note}: {checkpoint}', backbone is not None


def load_model_from_checkpoint(
        model_name: str,
        checkpoint: PathLike,
        *,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        use_ema: bool = False,
        **model_kwargs: Any,
) -> Tuple[nn.Module, str]:
    """Build `model_name` and load a checkpoint file into it strictly.

    Reads every file `read_checkpoint` does (timm train.py, `timm-layerattn train` and MMDetection checkpoints,
    state dicts, safetensors) and the official KCLA / MRLA / CNNtention layouts (converted with
    `convert_official`). `num_classes` and `in_chans` default to the checkpoint's classifier and stem shapes
    (a detector backbone has no classifier: `num_classes=0`). `use_ema` takes the EMA weights (default: the raw
    ones, as timm's validate.py).

    Returns:
        The model (eval mode) and a one-line description of what was loaded.
    """
    import timm
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
    from ..checkpoints.io import check_finite
    from ..checkpoints.match import check_state_dict
    from ..families import find_family
    from ..convert import convert_official, detect_official_family
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    model_family(arch)
    state_dict, note, is_backbone = read_checkpoint(checkpoint, use_ema=use_ema, model_name=arch)
    check_finite(state_dict, f'checkpoint {checkpoint}')
    family = find_family(arch)
    if family is not None and family.rules is not None:
        # e.g. the KCLA head dim read from norm_d (the released ImageNet code's 64); only when not the default
        needed, why = family.rules.model_kwargs(state_dict, family.models[arch])
        if needed and not needed.keys() & model_kwargs.keys():
            model_kwargs.update(needed)
            note += why
    if detect_official_family(state_dict) is not None:
        state_dict = convert_official(state_dict, arch, head_dim=model_kwargs.get('head_dim'))
        note += ' (official layout, converted)'
    cfg = get_pretrained_cfg(model_name) or get_pretrained_cfg(arch)
    classifier = getattr(cfg, 'classifier', None) or 'fc'
    first_conv = getattr(cfg, 'first_conv', None) or 'conv1'
    fc_w = state_dict.get(f'{classifier}.weight')
    if num_classes is None and fc_w is not None and fc_w.ndim == 2:
        num_classes = fc_w.shape[0]
    elif num_classes is None and is_backbone and fc_w is None:
        num_classes = 0
        note += ' (a detector backbone: no classifier, num_classes=0)'
    stem_w = state_dict.get(f'{first_conv}.weight')
    if in_chans is None and stem_w is not None and stem_w.ndim == 4:
        in_chans = stem_w.shape[1]
    kwargs = {k: v for k, v in dict(model_kwargs, num_classes=num_classes, in_chans=in_chans).items() if v is not None}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:  # the constructors' checks of their arguments
        raise UserError(f'cannot build {arch} with {kwargs}: {e}') from None
    check_state_dict(state_dict, model.state_dict(), what=f"'{arch}'")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # keys and shapes match (checked above): a module refused a value (KCLA's norm_d)
        detail = str(e).splitlines()[-1].strip()
        raise UserError(f"the checkpoint does not fit '{arch}': {detail}") from None
    return model.eval(), note
