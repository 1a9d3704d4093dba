"""Reading checkpoint files safely, finding the state dict inside them, and checking its values.

* `read_raw(path)`: the deserialised object of a safetensors file (recognised by its content, not only by
  its name) or a torch file read with `torch.load(weights_only=True)`. Nothing is ever fully unpickled; the
  `argparse.Namespace` that timm's train.py stores under `args` is allowed (`TRAINING_GLOBALS`, as timm's own
  reader does), so every entry point (convert, export, load_trunk, `--initial-checkpoint`, `--resume`, timm's
  pretrained loading) takes train.py checkpoints alike. Every error is a `UserError` naming the file.
* `unwrap_checkpoint(obj)`: the one rule for finding the weights in what training scripts save (below).
* `read_state_dict(path)`: both, keeping only the tensors.
* `non_finite_keys`, `check_state_dict_values`, `check_finite`: NaN / Inf weights load without a complaint
  and give NaN outputs, so they are refused where they enter.

The unwrapping rule, used by every reader and every model family's checkpoint filter:

1. While the dict holds a non-empty dict under a container key, descend into it. Container keys are tried in
   the order `state_dict_ema`, `model_ema`, `ema`, `state_dict`, `model` (`prefer_ema=True`, timm's choice),
   or `state_dict`, `model`, then the EMA keys (`prefer_ema=False`). A container wins even next to stray
   tensors (a `best_acc1` tensor of a training checkpoint).
2. Strip `module.` (DataParallel / DistributedDataParallel) and `_orig_mod.` (`torch.compile`) from the
   front of every key, as often as they occur (`module._orig_mod.module.x` is `x`).
"""
import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch

from .._utils.errors import UserError, first_line
from .._utils.files import path_problem
from .errors import CheckpointError

__all__ = [
    'StateDict', 'EMA_KEYS', 'MODEL_KEYS', 'WRAPPER_PREFIXES', 'read_raw', 'unwrap_checkpoint', 'unwrap_state_dict',
    'read_state_dict', 'strip_wrapper_prefixes', 'non_finite_keys', 'check_state_dict_values', 'check_finite',
    'format_keys', 'describe_type', 'UnsupportedGlobalError', 'select_prefix', 'strip_shared_prefix',
    'TRAINING_GLOBALS',
]

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

# Containers written by training scripts (timm, torchvision references, the official research code), EMA first.
EMA_KEYS = ('state_dict_ema', 'model_ema', 'ema')
MODEL_KEYS = ('state_dict', 'model')
# Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# Classes every torch checkpoint may hold besides tensors and plain values: timm train.py's `args` Namespace.
TRAINING_GLOBALS = (argparse.Namespace,)
# Nesting deeper than this is not a checkpoint any training script writes (and guards a self-referencing dict).
_MAX_DEPTH = 8
# A few keys of each kind in a message, the rest counted.
_SHOW = 3


def describe_type(obj: Any) -> str:
    """'a list', 'an int': the type of `obj` with its article."""
    name = type(obj).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def format_keys(keys: Sequence[str], show: int = _SHOW) -> str:
    """The first `show` keys, and how many more there are."""
    shown = ', '.join(keys[:show])
    return shown + (f', ... ({len(keys) - show} more)' if len(keys) > show else '')


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------

class UnsupportedGlobalError(UserError):
    """A torch file stores an object of a class outside the allow-list; `global_name` names it (e.g.
    'mmengine.logging.history_buffer.HistoryBuffer'), so a caller can retry with a wider, known allow-list."""

    def __init__(self, message: str, global_name: str):
        super().__init__(message)
        self.global_name = global_name


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b'{' and 0 < int.from_bytes(head[:8], 'little') < 100_000_000


def read_raw(path: PathLike, allowed_globals: Sequence[Any] = ()) -> Tuple[Any, str]:
    """The deserialised object of `path` and its format ('safetensors' or 'torch').

    Args:
        path: A safetensors file (by name or by content) or a torch file.
        allowed_globals: Classes `torch.load(weights_only=True)` may rebuild besides `TRAINING_GLOBALS` (always
            allowed: timm train.py's `argparse.Namespace`, as timm's own reader allows); nothing else is ever
            unpickled.
    """
    path = Path(path)
    problem = path_problem(path, 'file')
    if problem == 'not found':
        raise UserError(f'checkpoint not found: {path}')
    if problem is not None:
        raise UserError(f'checkpoint {path} {problem}' + ('; give the checkpoint file in it'
                                                          if problem.startswith('is a folder') else ''))
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
    safe_globals = getattr(torch.serialization, 'safe_globals', None)  # torch >= 2.5
    allowed = list(dict.fromkeys([*TRAINING_GLOBALS, *allowed_globals]))
    try:
        if safe_globals is not None:
            with safe_globals(allowed):
                obj = torch.load(str(path), map_location='cpu', weights_only=True)
        else:
            obj = torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        unsupported = re.search(r'Unsupported global: GLOBAL ([\w.]+)', msg)
        if unsupported and unsupported.group(1).startswith('mmengine.'):
            raise UnsupportedGlobalError(
                f'{path}: reading an mmengine Runner checkpoint (its message_hub holds {unsupported.group(1)}) '
                f'needs MMDetection (python scripts/install_mmcv.py, in a checkout or the sdist); or, where you '
                f'trust the file, re-save just the weights: torch.save(ckpt["state_dict"], "weights.pth")',
                unsupported.group(1))
        if unsupported:
            raise UnsupportedGlobalError(
                f'{path}: the checkpoint stores Python objects ({unsupported.group(1)}) that only a full unpickle '
                f'can read, and checkpoints are only ever loaded with weights_only=True. In a session where you '
                f'trust the file, re-save just the weights, e.g. torch.save(ckpt["state_dict"], "weights.pth") '
                f'or safetensors.torch.save_file(...)', unsupported.group(1))
        raise UserError(f'{path}: not a torch checkpoint, or it is corrupt ({first_line(e, "unpickling failed")})')
    except (EOFError, RuntimeError, ValueError, OSError) as e:
        raise UserError(f'{path}: cannot read the torch checkpoint, it may be truncated or corrupt '
                        f'({type(e).__name__}: {first_line(e, "unexpected end of file")})')
    except Exception as e:  # the weights-only unpickler fails in many ways on data that is not a checkpoint
        raise UserError(f'{path}: not a torch checkpoint, or it is corrupt ({type(e).__name__}: {first_line(e)})')
    return obj, 'torch'


# ---------------------------------------------------------------------------------------------------------------
# Unwrapping (the rule is in the module docstring)
# ---------------------------------------------------------------------------------------------------------------

def strip_wrapper_prefixes(key: Any) -> Any:
    """`key` without any leading run of `module.` / `_orig_mod.` prefixes (non-string keys unchanged)."""
    if not isinstance(key, str):
        return key
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def unwrap_checkpoint(obj: Any, prefer_ema: bool = True) -> Tuple[Dict[Any, Any], str]:
    """The state dict inside a training checkpoint, prefixes stripped, and the container path used.

    Values are kept as they are (non-tensors too), so a caller can still report them; `unwrap_state_dict`
    keeps only the tensors.

    Returns:
        `(state_dict, container)`, where `container` is the dotted path of container keys descended into,
        e.g. 'model.state_dict', or '' for a bare state dict.
    """
    if not isinstance(obj, Mapping):
        raise UserError(f'checkpoint holds a {type(obj).__name__}, expected a dict of tensors (a state dict)')
    order = EMA_KEYS + MODEL_KEYS if prefer_ema else MODEL_KEYS + EMA_KEYS
    used: List[str] = []
    for _ in range(_MAX_DEPTH):
        key = next((k for k in order if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
        if key is None:
            break
        used.append(key)
        obj = obj[key]
    return {strip_wrapper_prefixes(k): v for k, v in obj.items()}, '.'.join(used)


def select_prefix(state_dict: Mapping[Any, Any], prefix: str) -> Dict[str, Any]:
    """The entries of `state_dict` under `prefix` (e.g. a detector's 'backbone.'), the prefix stripped; empty when
    no key has it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}


def strip_shared_prefix(state_dict: Mapping[Any, Any], prefix: str) -> Dict[Any, Any]:
    """`state_dict` without `prefix` when every key has it (the `model.` of the MMDetection backbone wrapper, which
    holds the timm model under that name), else unchanged."""
    if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
        return select_prefix(state_dict, prefix)
    return dict(state_dict)


def unwrap_state_dict(obj: Any, prefer_ema: bool = True) -> Tuple[StateDict, str]:
    """`unwrap_checkpoint`, keeping only the tensors (leftovers such as an `epoch` int are dropped).

    A checkpoint without any tensor is a `UserError` listing its keys.
    """
    found, used = unwrap_checkpoint(obj, prefer_ema=prefer_ema)
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ', '.join(sorted(map(str, found.keys()))[:8]) or 'none'
        raise UserError(f'no tensors found in the checkpoint (top-level keys: {keys})')
    return tensors, used


def read_state_dict(
        path: PathLike,
        prefer_ema: bool = True,
        allowed_globals: Sequence[Any] = (),
) -> Tuple[StateDict, str]:
    """Read a checkpoint file safely and return `(state_dict, container)`; see `read_raw` and the unwrapping
    rule in the module docstring. Every error names the file."""
    obj, _ = read_raw(path, allowed_globals=allowed_globals)
    try:
        return unwrap_state_dict(obj, prefer_ema=prefer_ema)
    except UserError as e:
        raise UserError(f'{path}: {e}') from None


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------

def _nonfinite(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = t.numel() - nan - int(torch.isfinite(t).sum())
    return ', '.join(p for p in (f'{nan} NaN' if nan else '', f'{inf} Inf' if inf else '') if p)


def non_finite_keys(state_dict: Mapping[str, Any]) -> List[str]:
    """Keys of the floating-point / complex tensors of `state_dict` holding NaN or Inf (other values skipped).

    A tensor's sum is finite only if every element is (NaN and Inf propagate), and a plain sum is the
    cheapest full pass (about 5x cheaper than `isfinite(x).all()` or a max-abs norm on CPU); one host sync
    for the whole dict. A non-finite sum is confirmed element-wise, as a finite tensor's sum can overflow.
    """
    keys = [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()) and v.numel()
            and v.layout == torch.strided and not v.is_meta]
    if not keys:
        return []
    sums = torch.stack([state_dict[k].sum().to('cpu', torch.complex128) for k in keys])
    finite = torch.isfinite(sums)
    if bool(finite.all()):
        return []
    return [k for k, ok in zip(keys, finite.tolist()) if not ok and not bool(torch.isfinite(state_dict[k]).all())]


def check_state_dict_values(state_dict: Any, where: str) -> None:
    """Raise `CheckpointError` unless `state_dict` is a non-empty dict of tensors with finite values.

    NaN / Inf weights mean a corrupt file or a diverged training run, never weights worth loading. The scan
    costs about as much as one pass over the tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f'{where}: holds {describe_type(state_dict)}, expected a state dict (a dict of tensors)')
    others = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if len(others) == len(state_dict):
        keys = ', '.join(map(str, list(state_dict)[:_SHOW])) or 'it is empty'
        raise CheckpointError(f'{where}: holds no tensors (keys: {keys}); expected a state dict')
    if others:
        raise CheckpointError(f'{where}: {len(others)} entr{"y is" if len(others) == 1 else "ies are"} not a tensor: '
                              + format_keys([f'{k} ({type(state_dict[k]).__name__})' for k in others]))
    bad = non_finite_keys(state_dict)
    if bad:
        raise CheckpointError(
            f'{where}: {len(bad)} tensor(s) hold NaN / Inf values, refusing to load them: '
            + format_keys([f'{k} ({_nonfinite(state_dict[k])})' for k in bad])
            + '; the file is corrupt or comes from a diverged training run')


def check_finite(state_dict: Mapping[str, Any], what: str = 'the checkpoint') -> None:
    """Raise one `UserError` line naming the tensors of `state_dict` that hold NaN / inf values.

    The command-line form of `check_state_dict_values` (finiteness only): the tools that read checkpoints
    (convert, export, train) refuse such weights where they enter, as NaN != NaN breaks every equality
    check after them.
    """
    bad = non_finite_keys(state_dict)
    if bad:
        more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
        raise UserError(f'{what} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): '
                        f'{", ".join(bad[:3])}{more}')
