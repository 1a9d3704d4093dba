"""Checkpoint reading for the MMDetection plugin, always with `torch.load(weights_only=True)`.

Two jobs:

* mmengine 0.10 calls `torch.load` without `weights_only`; since torch 2.6 that means `weights_only=True`,
  and checkpoints saved by mmengine's Runner then fail to load (`load_from`, `--resume`, `tools/test.py`)
  because their `message_hub` holds a few non-tensor objects (mmengine's `HistoryBuffer`, NumPy arrays and
  scalars, and `getattr(HistoryBuffer, 'min')`-style method references). `enable_mmengine_checkpoint_loading()`
  wraps mmengine's registered checkpoint loaders so that, only while one of them runs, exactly those
  classes are allow-listed (`torch.serialization.safe_globals`) and `getattr` is replaced by a lookup
  that only reaches `HistoryBuffer` methods. Nothing is unpickled with `weights_only=False`, and
  `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` is never touched.
* `read_state_dict()` reads backbone weights from a local `.safetensors` / torch file, a `local-dir:`
  folder, an `hf-hub:` repo or an http(s) URL, for `LayerAttnResNet`'s `Pretrained` init.
  `fetch_source()` checks such a source when the backbone is built (a file or folder exists; a Hub or URL
  file is in its cache or is downloaded now), so a bad path fails before any dataset is built. Not cached and
  offline is one `WeightsNotFound` naming the cache and the `--cfg-options` that sets a local file instead.
"""
import contextlib
import functools
import os
import pickle
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

__all__ = [
    'mmengine_safe_globals', 'mmengine_checkpoint_globals', 'enable_mmengine_checkpoint_loading', 'read_state_dict',
    'fetch_source', 'hub_file', 'url_file', 'WeightsNotFound', 'CFG_OPTION', 'HUB_FILES',
]

# How a user points the shipped configs at a local file (MMDetection's tools take `--cfg-options`).
CFG_OPTION = '--cfg-options model.backbone.init_cfg.checkpoint='
# The weight files of a timm Hub repo, in the order timm's `load_state_dict_from_hf` tries them.
HUB_FILES = ('model.safetensors', 'pytorch_model.bin')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """`getattr` as Runner checkpoints use it, and nothing else: looking up `HistoryBuffer`'s statistics.

    The message hub pickles its `HistoryBuffer`s' statistics methods (`HistoryBuffer.min`, ...) by
    qualified name, i.e. as `getattr(HistoryBuffer, 'min')`. This stands in for `builtins.getattr` during
    the load, so no other attribute of any object can be reached.
    """
    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and not name.startswith('_') and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f'getattr({obj!r}, {name!r}) is not allowed in an mmengine checkpoint')


def mmengine_safe_globals() -> List[Any]:
    """The non-tensor globals of checkpoints saved by mmengine's Runner (numpy 1.x and 2.x spellings)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    np_core = getattr(np, '_core', None) or np.core  # numpy 2 renamed `core` to `_core`
    out: List[Any] = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_getattr, 'builtins.getattr')]
    for name in ('_reconstruct', 'scalar'):
        fn = getattr(np_core.multiarray, name)
        # Pickles name the module they were written with; allow both spellings for files from either numpy.
        out += [(fn, f'numpy.core.multiarray.{name}'), (fn, f'numpy._core.multiarray.{name}')]
    # numpy >= 1.25 pickles dtypes through per-dtype classes (`numpy.dtypes.Float64DType`, ...).
    for code in '?bhilqBHILQefdgFDGUSV':
        out.append(type(np.dtype(code)))
    return out


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Allow-list `mmengine_safe_globals()` for `weights_only` loads inside the block only."""
    if not hasattr(torch.serialization, 'safe_globals'):  # torch < 2.5 never defaults to weights_only
        yield
        return
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        yield


def _scoped(loader: Callable) -> Callable:
    @functools.wraps(loader)  # keeps `__name__`: mmengine logs the backend name from it
    def load(*args, **kwargs):
        with mmengine_checkpoint_globals():
            return loader(*args, **kwargs)
    load._timm_layerattn_scoped = True
    return load


def enable_mmengine_checkpoint_loading() -> None:
    """Make every registered mmengine checkpoint loader read Runner checkpoints under torch >= 2.6.

    Idempotent. Loaders registered later by other code are left as they are.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, '_timm_layerattn_scoped', False):
            CheckpointLoader.register_scheme(prefixes=prefix, loader=_scoped(loader), force=True)


def read_state_dict(source: str, prefer_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """Read a state dict (no model needed) from a file, `local-dir:DIR`, `hf-hub:ORG/NAME[@REV]` or a URL.

    Files (local, or downloaded by `hub_file` / `url_file` into the huggingface_hub / torch caches) go through
    the package's one reader, `checkpoints.io.read_state_dict`; folders through timm's, which finds the file.
    Torch pickles are read with `weights_only=True` (mmengine checkpoint contents and timm's `args` allowed);
    training containers and `module.` / `_orig_mod.` prefixes are unwrapped by the one rule of `checkpoints.io`.

    Returns:
        `(state_dict, container)`, `container` the dotted container path used ('' for a bare state dict).
    """
    import argparse
    from timm.models._hub import load_state_dict_from_path

    from ..checkpoints.io import read_state_dict as read_file
    from ..checkpoints.io import unwrap_state_dict

    with mmengine_checkpoint_globals():
        if source.startswith('local-dir:'):
            folder = os.path.expanduser(source[len('local-dir:'):])
            if not os.path.isdir(folder):
                raise WeightsNotFound(f'backbone checkpoint folder not found: {folder}')
            return unwrap_state_dict(load_state_dict_from_path(folder), prefer_ema=prefer_ema)
        if source.startswith('hf-hub:'):
            path = hub_file(source[len('hf-hub:'):], source)
        elif source.startswith(('http://', 'https://')):
            path = url_file(source, source)
        else:
            path = os.path.expanduser(source)
            if not os.path.isfile(path):
                fetch_source(source)  # raises the one message
        return read_file(path, prefer_ema=prefer_ema, allowed_globals=[argparse.Namespace])


# ---------------------------------------------------------------------------------------------------------------
# Sources, checked when the backbone is built
# ---------------------------------------------------------------------------------------------------------------

class WeightsNotFound(FileNotFoundError):
    """Backbone weights that are no local file, not in a cache, or cannot be downloaded."""


def _offline(spec: str, where: str, cache: str, stem: str) -> WeightsNotFound:
    """The one error of weights that are not cached and cannot be downloaded: the cache and the way out."""
    return WeightsNotFound(
        f'backbone weights {spec!r} not in the cache {cache} and cannot be downloaded (offline?); use a local '
        f'file: {CFG_OPTION}/path/to/{stem}.safetensors ({where}; downloaded on first use when online; '
        f'tools/test.py with a trained detector needs none: --cfg-options model.backbone.init_cfg=None)')


def hub_file(repo: str, spec: str, stem: str = 'model', prefer_cache: bool = False) -> str:
    """Local path of a Hub repo's weights file (`ORG/NAME[@REV]`), downloaded into the huggingface_hub cache
    if not there yet; `spec` and `stem` are for messages.

    `prefer_cache` takes a cached copy without asking the Hub for a newer revision (for timm's published
    weights, which do not change). Without a connection huggingface_hub retries for about 20 s before giving
    up; with `HF_HUB_OFFLINE=1` the answer is immediate.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition('@')

    def download(filename: str, local_only: bool) -> str:
        return hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=local_only)

    if prefer_cache:
        for filename in HUB_FILES:
            try:
                return download(filename, local_only=True)
            except EntryNotFoundError:  # LocalEntryNotFoundError included: not cached
                pass
    unreachable = False
    for filename in HUB_FILES:
        try:
            return download(filename, local_only=unreachable)
        except LocalEntryNotFoundError:  # not cached, and offline / no connection: the next one may be cached
            unreachable = True
        except EntryNotFoundError:  # the repo has no such file
            continue
        except OSError as e:  # repo or revision not found, HTTP errors (huggingface_hub's are OSErrors)
            from .._utils.errors import first_line
            raise WeightsNotFound(f'backbone weights {spec!r} (Hub repo {repo}): {first_line(e)}') from None
    if unreachable:
        raise _offline(spec, f'Hub repo {repo}', str(constants.HF_HUB_CACHE), stem)
    raise WeightsNotFound(f'backbone weights {spec!r}: Hub repo {repo} has none of {", ".join(HUB_FILES)}')


def url_file(url: str, spec: str, stem: str = 'model') -> str:
    """Local path of a weights URL, downloaded into torch's hub cache as timm does."""
    from timm.models._hub import download_cached_file
    try:
        return download_cached_file(url)
    except OSError:  # urllib's URLError included
        raise _offline(spec, url, os.path.join(torch.hub.get_dir(), 'checkpoints'), stem) from None


def fetch_source(source: str) -> None:
    """Check a `read_state_dict` source now: a file / folder exists, a Hub or URL file is cached or downloaded.

    Raises:
        WeightsNotFound: With the path, or (offline, not cached) the cache and the `--cfg-options` to use.
    """
    if source.startswith('hf-hub:'):
        hub_file(source[len('hf-hub:'):], source)
    elif source.startswith('local-dir:'):
        folder = os.path.expanduser(source[len('local-dir:'):])
        if not os.path.isdir(folder):
            raise WeightsNotFound(f'backbone checkpoint folder not found: {folder}')
    elif source.startswith(('http://', 'https://')):
        url_file(source, source)
    elif not os.path.isfile(os.path.expanduser(source)):
        raise WeightsNotFound(
            f'backbone checkpoint not found: {os.path.expanduser(source)} (a .safetensors / torch file, '
            f'local-dir:DIR, hf-hub:ORG/NAME or a URL; set it with {CFG_OPTION}...)')
