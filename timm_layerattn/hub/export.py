"""Export to a Hub-ready folder: `model.safetensors` (the plain state dict), `config.json` in timm's format (written
by `timm.models.save_for_hf`) and `README.md`, the model card; with `onnx=True` also `model.onnx` (see `onnx.py`),
checked against onnxruntime before the folder is renamed into place.

Every export is written to a temporary sibling folder, reloaded through
`timm.create_model('local-dir:...', pretrained=True)` and compared bit for bit with the source model before it is
renamed into place, so a folder that exists is a folder that loads.
"""
import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._utils.errors import UserError, first_line
from .._utils.files import MARKER_KEY, atomic_dir, check_output_dir, output_marker, read_marker
from ..checkpoints.io import EMA_KEYS, MODEL_KEYS
from .card import model_family, render_model_card, resolve_dataset, validate_metrics

__all__ = ['HUB_FILES', 'OPTIONAL_HUB_FILES', 'EXPORT_KIND', 'export_folder', 'is_export_folder', 'hub_files',
           'check_export_dir', 'check_repo_id', 'load_model_from_checkpoint', 'read_checkpoint']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# The files every Hub repo of ours holds, and those an export may add (uploaded when config.json records them).
HUB_FILES = ('config.json', 'model.safetensors', 'README.md')
OPTIONAL_HUB_FILES = ('model.onnx',)

_TAG_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_\-]*$')


def check_repo_id(repo_id: str) -> None:
    """Raise `UserError` unless `repo_id` is `<org-or-user>/<name>`."""
    if not re.fullmatch(r'[A-Za-z0-9][\w.\-]*/[\w.\-]+', repo_id or '') or '..' in repo_id:
        raise UserError(f"invalid repo id {repo_id!r}: expected '<org-or-user>/<name>'")


def _check_label_names(label_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    """Class names as strings, one per model output, or None."""
    if label_names is None:
        return None
    if isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence):
        raise UserError('label_names must be a list of class names')
    names = [str(n) for n in label_names]
    if len(names) != num_classes:
        raise UserError(f'{len(names)} label names given for a model with {num_classes} classes')
    return names


def _verify_export(model: nn.Module, folder: Path) -> None:
    """Reload `folder` through timm's `local-dir:` path and require bit-identical weights and logits."""
    import timm
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None else torch.float32
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).to(device=device, dtype=dtype).eval()
    src_sd, new_sd = model.state_dict(), reloaded.state_dict()
    if src_sd.keys() != new_sd.keys():
        diff = sorted(set(src_sd) ^ set(new_sd))
        raise UserError(f'export check failed: the reloaded model has different keys ({", ".join(diff[:5])})')
    for k, v in src_sd.items():
        if not torch.equal(v, new_sd[k].to(v.dtype)):
            raise UserError(f'export check failed: {k} differs after reloading the exported folder')
    input_size = reloaded.pretrained_cfg.get('input_size', (3, 224, 224))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, model.in_chans if hasattr(model, 'in_chans') else input_size[0], *input_size[1:]),
                    generator=gen).to(device=device, dtype=dtype)
    try:
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(x), reloaded(x))
    finally:
        model.train(was_training)
    if not same:
        raise UserError('export check failed: the reloaded model gives different outputs')


def _verify_hook() -> Callable[[nn.Module, Path], None]:
    """The verification `export_folder` runs: `_verify_export`, unless `timm_layerattn.hub._verify_export` was set.

    Replacing it on the package (as the signal tests do, to pause an export inside its temporary folder) keeps
    working now that the code lives in this submodule.
    """
    return getattr(sys.modules.get(__package__), '_verify_export', None) or _verify_export


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / EMA (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    for _ in range(4):
        inner = getattr(model, '_orig_mod', None) or getattr(model, 'module', None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


EXPORT_KIND = 'an export folder of timm_layerattn (config.json with its marker, nothing else)'


def is_export_folder(folder: PathLike) -> bool:
    """Whether `folder` is an export of ours that `--overwrite` may replace: its config.json carries the
    package's marker entry and it holds nothing but the exported files (so replacing it loses nothing else)."""
    folder = Path(folder)
    names = HUB_FILES + OPTIONAL_HUB_FILES
    try:
        return read_marker(folder / 'config.json') is not None and all(p.name in names for p in folder.iterdir())
    except OSError:
        return False


def hub_files(folder: PathLike) -> List[str]:
    """The files of an export folder that go to the Hub: `HUB_FILES`, plus `model.onnx` when it is there and
    config.json records it (an ONNX graph that `export --onnx` checked, not a stray file)."""
    folder = Path(folder)
    files = list(HUB_FILES)
    marker = read_marker(folder / 'config.json') or {}
    onnx_file = (marker.get('onnx') or {}).get('file') if isinstance(marker.get('onnx'), dict) else None
    if onnx_file in OPTIONAL_HUB_FILES and (folder / onnx_file).is_file():
        files.append(onnx_file)
    return files


def check_export_dir(out_dir: PathLike, overwrite: bool = False, what: str = 'output folder') -> None:
    """Raise `UserError` unless `export_folder(..., out_dir, overwrite=overwrite)` may write `out_dir`.

    For early checks, before the work that precedes an export (loading, training).
    """
    check_output_dir(out_dir, overwrite, is_ours=is_export_folder, kind=EXPORT_KIND, what=what)


def export_folder(
        model: nn.Module,
        out_dir: PathLike,
        *,
        model_name: str,
        tag: Optional[str] = None,
        dataset: Optional[str] = None,
        metrics: Optional[dict] = None,
        label_names: Optional[list] = None,
        recipe: Optional[str] = None,
        overwrite: bool = False,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        verify: bool = True,
        onnx: bool = False,
        onnx_features_only: bool = False,
        onnx_out_indices: Optional[Sequence[int]] = None,
) -> Path:
    """Write a Hub-ready folder (`model.safetensors`, `config.json`, `README.md`, optionally `model.onnx`) for `model`.

    Args:
        model: A model built by `timm.create_model` (it carries the `pretrained_cfg` that `config.json` records);
            DDP, EMA and `torch.compile` wrappers are looked through.
        out_dir: Destination folder; written atomically (nothing is left behind on error).
        model_name: Architecture name, optionally with a tag (`'cifar_resnet20_kcla.cifar10'`).
        tag: Pretrained tag the weights are published under (default: from `model_name`, else the dataset).
        dataset: Training dataset (`cifar10`, `cifar100`, `imagenet-1k`, or a Hub dataset id).
        metrics: Evaluation results, e.g. `{'top1': 91.2, 'top5': 99.7}`; they go into the card's model-index.
        label_names: Class names, one per output.
        recipe: Training recipe (markdown) for the card.
        overwrite: Replace an existing `out_dir`, if it is an earlier export (see `is_export_folder`); another
            folder or a file is never replaced.
        repo_id: The Hub repo the folder is meant for (used in the card's usage snippet).
        license: Licence of the weights (default: the registry cfg's).
        verify: Reload the folder through `local-dir:` and require bit-identical weights and outputs.
        onnx: Also write `model.onnx` (dynamic batch / height / width, opset `onnx.OPSET`), exported from the
            folder's own weights as `timm.create_model('local-dir:...')` loads them and checked against them with
            onnxruntime at two input shapes; a failed check fails the export. Needs onnx, onnxscript, onnxruntime.
        onnx_features_only: Make `model.onnx` the `features_only=True` backbone (feature maps, not logits).
        onnx_out_indices: The backbone's `out_indices` (default: timm's, every stage).

    Returns:
        The folder path.
    """
    from timm.models import is_model, save_for_hf, split_model_name_tag
    model = _unwrap(model)
    arch, name_tag = split_model_name_tag(model_name)
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    model_family(arch)
    pretrained_cfg = getattr(model, 'pretrained_cfg', None)
    if not pretrained_cfg:
        raise UserError('the model has no pretrained_cfg; build it with timm.create_model(...)')
    if pretrained_cfg.get('architecture') not in (None, arch):
        raise UserError(f"model_name '{arch}' does not match the model, a '{pretrained_cfg['architecture']}'")
    ds = resolve_dataset(dataset)
    tag = tag or name_tag or (ds.tag if ds is not None else None)
    if tag is not None and not _TAG_RE.match(tag):
        raise UserError(f'invalid tag {tag!r}: use letters, digits, "_" and "-" (e.g. "mylab_cifar10")')
    metrics = validate_metrics(metrics)
    num_classes = getattr(model, 'num_classes', pretrained_cfg.get('num_classes', 0))
    label_names = _check_label_names(label_names, num_classes)
    if repo_id is not None:
        check_repo_id(repo_id)
    license = license or pretrained_cfg.get('license')
    from ..checkpoints.io import check_finite
    check_finite(model.state_dict(), f'the model ({arch})')
    if (onnx_features_only or onnx_out_indices is not None) and not onnx:
        raise UserError('features_only / out_indices choose what model.onnx computes: they need onnx=True (--onnx)')
    if onnx:
        from .onnx import require_onnx
        require_onnx()  # before any work: a missing package is named at once

    cfg_overrides: Dict[str, Any] = {'tag': tag, 'license': license}
    model_config: Dict[str, Any] = {'pretrained_cfg': cfg_overrides}
    if label_names:
        model_config['label_names'] = label_names
    card_args = dict(model_name=arch, tag=tag, dataset=dataset, metrics=metrics, recipe=recipe, repo_id=repo_id,
                     license=license)
    card = render_model_card(model, **card_args)  # before writing anything: a card that fails costs nothing
    with atomic_dir(out_dir, overwrite=overwrite, is_ours=is_export_folder, kind=EXPORT_KIND) as tmp:
        try:
            save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        except ValueError as e:
            raise UserError(f'cannot export the model config: {e}') from None
        config_path = tmp / 'config.json'
        config = json.loads(config_path.read_text())
        config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items() if v is not None}
        config[MARKER_KEY] = output_marker('export', family=model_family(arch))
        config_path.write_text(json.dumps(config, indent=2) + '\n')
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        if verify:
            _verify_hook()(model, tmp)
        if onnx:
            record = _write_onnx(tmp, onnx_features_only, onnx_out_indices)
            config[MARKER_KEY]['onnx'] = record
            config_path.write_text(json.dumps(config, indent=2) + '\n')
            card = render_model_card(model, **card_args, onnx=record)
            (tmp / 'README.md').write_text(card, encoding='utf-8')
    _logger.info(f'exported {arch} to {out_dir}')
    return Path(out_dir)


def _write_onnx(folder: Path, features_only: bool, out_indices: Optional[Sequence[int]]) -> Dict[str, Any]:
    """Export `folder/model.onnx` from the folder as `local-dir:` loads it (classifier or backbone) and return
    the record config.json keeps."""
    import timm
    from .onnx import ONNX_FILE, export_onnx
    kwargs: Dict[str, Any] = {}
    if features_only:
        kwargs['features_only'] = True
        if out_indices is not None:
            kwargs['out_indices'] = tuple(out_indices)
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)
    except (AssertionError, IndexError, ValueError, TypeError) as e:  # timm's checks of out_indices
        raise UserError(f'cannot build the features_only backbone with {kwargs}: {first_line(e)}') from None
    result = export_onnx(model, folder / ONNX_FILE)
    checked = ', '.join(f"{'x'.join(map(str, c.shape))} (max abs {c.max_abs_err:.2g}, rel {c.max_rel_err:.2g})"
                        for c in result.checks)
    _logger.info(f'{ONNX_FILE}: opset {result.opset}, exported in {result.seconds:.1f}s, checked at {checked}')
    return result.record()


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
    from ..checkpoints.kcla_mrla import infer_head_dim
    from ..checkpoints.match import check_state_dict, layer_attn
    from ..convert import convert_official, detect_official_family
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    model_family(arch)
    state_dict, note, is_backbone = read_checkpoint(checkpoint, use_ema=use_ema, model_name=arch)
    check_finite(state_dict, f'checkpoint {checkpoint}')
    head_dim = infer_head_dim(state_dict)
    if head_dim is not None and 'head_dim' not in model_kwargs and model_family(arch) == 'kcla':
        default = getattr(layer_attn(timm.create_model(arch, device='meta').cfg), 'head_dim', None)
        if head_dim != default:  # e.g. the released ImageNet KCLA code's 64; only recorded when not the default
            model_kwargs['head_dim'] = head_dim
            note += f' (KCLA head_dim {head_dim}, read from norm_d)'
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
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), note
