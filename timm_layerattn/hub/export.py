"""Export to a Hub-ready folder: `model.safetensors` (the plain state dict), `config.json` in timm's format (written
by `timm.models.save_for_hf`) and `README.md`, the model card; with `onnx=True` also `model.onnx` (see `onnx.py`),
checked against onnxruntime before the folder is renamed into place.

Every export is written to a temporary sibling folder, reloaded through
`timm.create_model('local-dir:...', pretrained=True)` and compared bit for bit with the source model before it is
renamed into place, so a folder that exists is a folder that loads.

Where the model comes from (a checkpoint file read and loaded into a fresh model) is `source.py`.
"""
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._utils.errors import UserError, first_line
from .._utils.files import MARKER_KEY, atomic_dir, check_output_dir, output_marker, read_marker
from .card import model_family, render_model_card, resolve_dataset, validate_metrics

__all__ = ['HUB_FILES', 'OPTIONAL_HUB_FILES', 'EXPORT_KIND', 'export_folder', 'is_export_folder', 'hub_files',
           'check_export_dir', 'check_repo_id']

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
