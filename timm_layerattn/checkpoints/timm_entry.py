"""Pretrained checkpoints loaded through timm's own entry points, with one clear error per bad checkpoint.

`timm.create_model(name, pretrained=True, ...)` reads and loads weights inside timm (`load_pretrained`), so
a bad checkpoint surfaces from deep inside torch / safetensors: a bare `FileNotFoundError()`, a
`SafetensorError` naming no file, an `AttributeError` for a file holding a list, a multi-line strict-load
error, or, for NaN weights, nothing at all. Every model of this package is built by `build_la_model`, which
runs timm's build through `build_checked`:

* a `file` / `local-dir:` source is checked up front with stat calls only (exists, is a file, not empty,
  the folder has a weights file), before the model is built;
* the family's checkpoint filter is wrapped, so what timm read is checked (a dict of tensors, all finite)
  before timm adapts and loads it;
* an error from timm's reading or strict loading becomes a `CheckpointError` (`errors.py`) naming the
  file and the problem. Only then is the file read again (safely, `weights_only=True`) to find out why, so
  a good checkpoint is read once.

timm itself is never patched. Errors raised before any of this package's code runs (reading a `local-dir:`
folder's or a Hub repo's `config.json` in `timm.create_model`) stay timm's and huggingface_hub's.
"""
import argparse
import itertools
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError, first_line
from .errors import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError)
from .io import check_state_dict_values, describe_type, read_raw, unwrap_state_dict
from .match import fit_hints, match_keys

__all__ = ['build_checked']

# `name -> architecture config` to suggest architectures from, or None for the family registry.

# The weights files `timm.models._hub.load_state_dict_from_path` looks for in a `local-dir:` folder, in order
# (then the first file per extension, extensions in this order).
_FOLDER_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth',
                 'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                 'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth')
_FOLDER_EXTS = ('.safetensors', '.pth', '.pth.tar', '.bin')
# What `timm.models._hub.load_state_dict_from_hf` downloads when the cfg names no file: the safetensors
# alternative first, then the torch file.
_HUB_FILES = ('model.safetensors', 'pytorch_model.bin')
# A few file names in a hint.
_SHOW = 3


class _Source:
    """A resolved weight source: timm's kind, its location, the name used in messages, the file once known."""

    def __init__(self, kind: str, location: Any, cfg: Dict[str, Any], cache_dir: Any = None):
        self.kind = kind
        self.location = location
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.path: Optional[Path] = None
        if kind == 'file':
            self.path = Path(location)
            self.label = str(location)
        elif kind == 'local-dir':
            self.label = f'local-dir:{location}'
        elif kind == 'hf-hub':
            self.repo = location[0] if isinstance(location, (list, tuple)) else location
            self.label = f'hf-hub:{self.repo}'
        elif kind == 'url':
            self.label = str(location)
        else:
            self.label = 'the state_dict of the pretrained cfg'

    def where(self) -> str:
        """The label, plus the file it resolved to when that differs (a folder's or the Hub cache's file)."""
        if self.path is None and self.kind == 'hf-hub':
            self.path = _hub_cached_file(self)
        if self.path is not None and str(self.path) != self.label:
            return f'{self.label} ({self.path})'
        return self.label


# -----------------------------------------------------------------------------------------------------------
# Up-front checks (stat calls only)
# -----------------------------------------------------------------------------------------------------------

def _check_file(path: Path, label: str) -> None:
    if not path.exists():
        hint = ''
        if path.parent.is_dir():
            entries = itertools.islice(path.parent.iterdir(), 1000)  # a hint only: never list a huge folder
            near = sorted(p.name for p in entries if p.suffix in ('.safetensors', '.pth', '.bin'))
            if near:
                hint = f' ({path.parent} has: {", ".join(near[:_SHOW])})'
        if str(path).startswith('~'):
            hint = ' (timm does not expand ~: pass os.path.expanduser(path))'
        raise CheckpointNotFoundError(f'pretrained weights file not found: {label}{hint}', path=str(path))
    if path.is_dir():
        hint = ''
        if (path / 'config.json').is_file():
            hint = f"; for an exported folder use timm.create_model('local-dir:{path}', pretrained=True)"
        raise CheckpointError(f'{label}: is a folder, not a checkpoint file{hint}', path=str(path))
    if not path.is_file():
        raise CheckpointError(f'{label}: not a regular file', path=str(path))
    if not os.access(path, os.R_OK):
        raise CheckpointError(f'{label}: permission denied (the file is not readable)', path=str(path))
    if path.stat().st_size == 0:
        raise CheckpointError(f'{label}: file is empty', path=str(path))


def _folder_weights(folder: Path) -> Optional[Path]:
    """The file timm's `load_state_dict_from_path` will pick in `folder` (same order), None if none."""
    for name in _FOLDER_FILES:
        if (folder / name).exists():
            return folder / name
    for ext in _FOLDER_EXTS:
        files = sorted(folder.glob(f'*{ext}'))
        if files:
            return files[0]
    return None


def _check_source(source: _Source) -> None:
    if source.kind == 'file':
        _check_file(source.path, source.label)
    elif source.kind == 'local-dir':
        folder = Path(source.location)
        if not folder.is_dir():
            raise CheckpointNotFoundError(f'{source.label}: folder not found', path=str(folder))
        found = _folder_weights(folder)
        if found is None:
            raise CheckpointNotFoundError(
                f'{source.label}: no weights file in the folder (looked for model.safetensors, pytorch_model.bin, '
                f'model.pth, ... and any *.safetensors / *.pth / *.pth.tar / *.bin); export a model into it with '
                f'`timm-layerattn export`', path=str(folder))
        source.path = found
        _check_file(found, str(found))


# -----------------------------------------------------------------------------------------------------------
# Why a file could not be read (only run after timm failed to read it)
# -----------------------------------------------------------------------------------------------------------

def _diagnose_file(path: Path, where: str, error: BaseException) -> CheckpointError:
    """A `CheckpointError` explaining why timm could not read `path`."""
    from .._utils.files import path_problem
    if path_problem(path) == 'not found':  # a folder, a FIFO, a symbolic link loop: the reader says which
        return CheckpointNotFoundError(f'pretrained weights file not found: {where}', path=str(path))
    named_safetensors = path.name.endswith('.safetensors')
    if named_safetensors and zipfile.is_zipfile(path):
        return CheckpointError(
            f'{where}: a torch checkpoint (zip archive) named .safetensors; timm picks the reader by the name, '
            f'rename it to .pth', path=str(path))
    try:
        # timm's reader allows `argparse.Namespace` (the `args` of timm training checkpoints); so does this one
        obj, fmt = read_raw(path, allowed_globals=[argparse.Namespace])
    except UserError as e:
        text = str(e)
        if text.startswith(str(path)):
            text = text[len(str(path)):].lstrip(': ')
        return CheckpointError(f'{where}: {text}', path=str(path))
    if fmt == 'safetensors' and not named_safetensors:
        return CheckpointError(
            f"{where}: a safetensors file whose name does not end in .safetensors; timm picks the reader by the "
            f"name (this one is read with torch.load), rename it to {path.stem}.safetensors", path=str(path))
    if not isinstance(obj, Mapping):
        return CheckpointError(
            f'{where}: holds {describe_type(obj)}, expected a state dict (a dict of tensors)', path=str(path))
    try:
        unwrap_state_dict(obj)
    except UserError as e:
        return CheckpointError(f'{where}: {e}', path=str(path))
    return CheckpointError(f'{where}: cannot be loaded ({type(error).__name__}: {first_line(error)})',
                           path=str(path))


def _hub_names(source: _Source) -> List[str]:
    """The weights files timm tries in an `hf-hub` source: the cfg's `hf_hub_filename`, else `_HUB_FILES`."""
    return [source.location[1]] if isinstance(source.location, (list, tuple)) else list(_HUB_FILES)


def _hub_cached_file(source: _Source) -> Optional[Path]:
    """The cached weights file of an `hf-hub` source (the one timm read), None if none is cached."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import hf_split
    repo, revision = hf_split(source.repo)
    for name in _hub_names(source):
        found = try_to_load_from_cache(repo, name, cache_dir=source.cache_dir, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_error(source: _Source, error: BaseException) -> Optional[CheckpointError]:
    """A clear error for a failed Hub weights download, None for errors huggingface_hub already words well."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        return None
    if isinstance(error, LocalEntryNotFoundError):
        cache = source.cache_dir or constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            why = 'and offline mode is on (HF_HUB_OFFLINE=1): unset it to download them, or download them once online'
        else:
            why = f'and downloading them failed ({first_line(error)})'
        return CheckpointNotCachedError(
            f'{source.label}: the weights ({" / ".join(_hub_names(source))}) are not in the local Hub cache ({cache}) '
            f'{why}',
            path=source.repo)
    if isinstance(error, EntryNotFoundError):
        return CheckpointNotFoundError(
            f'{source.label}: the repo has no weights file ({" or ".join(_hub_names(source))}); is it an export of '
            f'`timm-layerattn export` / `push`?', path=source.repo)
    return None


def _read_error(source: _Source, error: BaseException) -> Optional[CheckpointError]:
    """Explain an error raised while timm read the checkpoint; None if it is not about the checkpoint."""
    if source.kind == 'hf-hub':
        hub = _hub_error(source, error)
        if hub is not None:
            return hub
        source.path = _hub_cached_file(source)
        if source.path is None:
            return None
        err = _diagnose_file(source.path, source.where(), error)
        cache = next((p for p in source.path.parents if p.name.startswith('models--')), None)
        if cache is not None and not isinstance(err, CheckpointNotFoundError):
            err = CheckpointError(f'{err}; delete {cache} to download it again', path=err.path)
        return err
    if source.kind == 'url':
        name = os.path.basename(str(source.location).split('?')[0])
        cached = Path(source.cache_dir or Path(torch.hub.get_dir()) / 'checkpoints') / name
        if not cached.is_file():
            if isinstance(error, OSError):  # urllib's URLError / HTTPError name no URL
                return CheckpointError(f'{source.label}: download failed ({first_line(error)})',
                                       path=source.label)
            return None
        source.path = cached
        return _diagnose_file(cached, source.where(), error)
    if source.path is not None:
        return _diagnose_file(source.path, source.where(), error)
    return None


# -----------------------------------------------------------------------------------------------------------
# Why a checkpoint does not fit the model (only run after timm's strict load failed)
# -----------------------------------------------------------------------------------------------------------

def _hints(source: _Source, model: nn.Module, sd: Mapping[str, torch.Tensor],
           expected: Mapping[str, torch.Tensor]) -> List[str]:
    classifier = source.cfg.get('classifier') or 'fc'
    return fit_hints(
        sd, expected, arch=source.cfg.get('architecture') or type(model).__name__,
        model_cfg=getattr(model, 'cfg', None), classifier=classifier if isinstance(classifier, str) else classifier[0],
        declared_classes=source.cfg.get('num_classes'))


def _mismatch_error(source: _Source, model: nn.Module, sd: Mapping[str, torch.Tensor],
                    error: BaseException) -> CheckpointMismatchError:
    """One line for torch's multi-line strict `load_state_dict` error: what does not fit, and what to do."""
    text = str(error)
    expected = model.state_dict()
    # Only the kinds torch complained about: timm loads non-strictly after dropping a classifier.
    kinds = tuple(kind for kind, said in (('unexpected', 'Unexpected key(s)'), ('missing', 'Missing key(s)'),
                                          ('shape', 'size mismatch')) if said in text)
    parts = match_keys(sd, expected).parts(kinds=kinds)
    if not parts:
        parts.append(first_line(error))
    arch = source.cfg.get('architecture') or type(model).__name__
    message = f"{source.where()}: checkpoint does not fit '{arch}': " + '; '.join(parts)
    hints = _hints(source, model, sd, expected)
    if hints:
        message += '. Hint: ' + '; '.join(hints)
    return CheckpointMismatchError(message, path=str(source.path or source.label))


def _stem_error(source: _Source, model: nn.Module, sd: Mapping[str, torch.Tensor],
                error: BaseException) -> CheckpointMismatchError:
    """timm's 'inconsistent with input_size' stem error, naming the file and saying what to declare."""
    message = f'{source.where()}: {first_line(error)}'
    m = re.match(r"Pretrained (\S+) weight", str(error))
    weight = sd.get(m.group(1) + '.weight') if m else None
    if weight is not None and weight.ndim == 4:
        size = tuple((source.cfg.get('input_size') or (3, 224, 224))[1:])
        message += (f' Hint: the checkpoint\'s stem takes {weight.shape[1]} channel(s); declare it with '
                    f'pretrained_cfg_overlay=dict(..., input_size={(weight.shape[1], *size)}) and timm adapts it to '
                    f'the in_chans you ask for')
    return CheckpointMismatchError(message, path=str(source.path or source.label))


# -----------------------------------------------------------------------------------------------------------
# The guarded build
# -----------------------------------------------------------------------------------------------------------

class _Watch:
    """Stands in for the model class and the filter fn, to know which stage of timm's build an error came from."""

    def __init__(self, model_cls: Callable[..., nn.Module], filter_fn: Optional[Callable], source: _Source):
        self.model_cls = model_cls
        self.filter_fn = filter_fn
        self.source = source
        self.model: Optional[nn.Module] = None
        self.state_dict: Optional[Dict[str, torch.Tensor]] = None

    def build(self, *args: Any, **kwargs: Any) -> nn.Module:
        self.model = self.model_cls(*args, **kwargs)
        return self.model

    def error(self, problem: str) -> CheckpointError:
        where = self.source.where()  # resolves a Hub source's cached file: on error paths only
        return CheckpointError(f'{where}: {problem}', path=str(self.source.path or self.source.label))

    def filter(self, state_dict: Any, model: nn.Module) -> Dict[str, torch.Tensor]:
        # Never raises TypeError: timm retries a filter that does with one argument (an old filter signature).
        if not isinstance(state_dict, Mapping):
            raise self.error(f'holds {describe_type(state_dict)}, expected a state dict (a dict of tensors)')
        if self.filter_fn is not None:
            try:
                state_dict = self.filter_fn(state_dict, model)
            except PretrainedWeightsError:
                raise
            except Exception as e:
                raise self.error(
                    f'not a checkpoint of this model family ({type(e).__name__}: {first_line(e)})') from None
        label = self.source.label
        try:
            check_state_dict_values(state_dict, label)
        except CheckpointError as e:
            raise self.error(str(e)[len(label) + 2:]) from None
        self.state_dict = state_dict
        return state_dict


def _translate(watch: _Watch, error: BaseException) -> Optional[CheckpointError]:
    """Our error for an exception of timm's build, None if it is not about the checkpoint."""
    if watch.model is None or isinstance(error, MemoryError):
        return None  # the constructor failed, or the machine did: not ours to explain
    if watch.state_dict is None:
        return _read_error(watch.source, error)
    if isinstance(error, RuntimeError):
        text = str(error)
        if text.startswith('Error(s) in loading state_dict'):
            return _mismatch_error(watch.source, watch.model, watch.state_dict, error)
        if text.startswith('Pretrained ') and 'inconsistent with input_size' in text:
            return _stem_error(watch.source, watch.model, watch.state_dict, error)
    return None


def build_checked(
        build_fn: Callable[..., nn.Module],
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool,
        filter_fn: Optional[Callable],
        source: Tuple[str, Any, Dict[str, Any]],
        **kwargs: Any,
) -> nn.Module:
    """Run `build_fn` (timm's `build_model_with_cfg`) with the checks and error translation described above.

    Args:
        build_fn: Called as `build_fn(model_cls, variant, pretrained, pretrained_filter_fn=..., **kwargs)`.
        model_cls: The model class (or factory).
        filter_fn: The family's checkpoint filter, `(state_dict, model) -> state_dict`.
        source: `resolve_pretrained_source(...)` of the call: `(load_from, location, cfg)`.
    """
    load_from, location, cfg = source
    src = _Source(load_from, location, cfg, cache_dir=kwargs.get('cache_dir'))
    _check_source(src)
    watch = _Watch(model_cls, filter_fn, src)
    try:
        return build_fn(watch.build, variant, pretrained, pretrained_filter_fn=watch.filter, **kwargs)
    except PretrainedWeightsError as e:
        raise e.with_traceback(None) from None  # ours already, raised below timm: drop timm's frames
    except Exception as e:
        err = _translate(watch, e)
        if err is None:
            raise
        raise err from None
