"""Checkpoints of `timm-layerattn train`: read (resume, initial weights), write (the saver), checksum, export.

Checkpoints are plain dicts of tensors and Python scalars, so they load with `torch.load(..., weights_only=True)`:
the run's arguments are stored as a plain dict, not as timm's `argparse.Namespace`.
"""
import argparse
import hashlib
import re
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .recipes import recipe_markdown

__all__ = ['CHECKPOINT_EXT', 'is_run_dir', 'read_checkpoint', 'check_checkpoint_matches', 'read_initial_checkpoint',
           'to_plain', 'plain_args', 'create_saver', 'state_checksum', 'apply_data_config', 'export_checkpoint']

CHECKPOINT_EXT = '.pth.tar'


def is_run_dir(path: Path) -> bool:
    """Whether `path` already holds a training run (its log, summary or last checkpoint)."""
    return path.is_dir() and any((path / n).exists() for n in ('log.json', 'summary.csv', 'last' + CHECKPOINT_EXT))


def check_input_file(path: str, what: str) -> None:
    """Raise a one-line UserError unless `path` is a readable file: 'not found' only when nothing is there."""
    from .._utils.files import path_problem
    problem = path_problem(path, 'file')
    if problem == 'not found':
        raise UserError(f'{what} not found: {path}')
    if problem is not None:
        hint = ' (give a checkpoint file, e.g. its last.pth.tar)' if problem.startswith('is a folder') else ''
        raise UserError(f'{what} {path} {problem}{hint}')


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a training checkpoint through the one safe reader (weights_only; timm's argparse `args`
    allowed) or raise UserError."""
    from ..checkpoints.io import read_raw
    check_input_file(path, '--resume checkpoint')
    try:
        ckpt, _ = read_raw(path)
    except UserError as e:
        raise UserError(f'cannot read checkpoint {e}') from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no "state_dict" entry)')
    return ckpt


def check_checkpoint_matches(ckpt: Dict[str, Any], model: nn.Module, model_name: str, path: str) -> None:
    """Raise UserError unless `ckpt` holds weights of exactly this architecture (names and shapes)."""
    from ..checkpoints.io import strip_wrapper_prefixes
    from ..checkpoints.match import match_keys
    arch = ckpt.get('arch')
    if isinstance(arch, str) and arch and arch != model_name:
        raise UserError(f'{path} is a checkpoint of {arch!r}, not of --model {model_name!r}')
    state = {strip_wrapper_prefixes(k): v for k, v in ckpt['state_dict'].items()}
    fit = match_keys(state, model.state_dict())
    if not fit.ok:
        parts = []
        if fit.missing:
            parts.append(f'{len(fit.missing)} missing (e.g. {fit.missing[0]})')
        if fit.unexpected:
            parts.append(f'{len(fit.unexpected)} unexpected (e.g. {fit.unexpected[0]})')
        if fit.mismatched:
            k = fit.mismatched[0]
            have, want = fit.shapes[k]
            parts.append(f'{len(fit.mismatched)} with other shapes (e.g. {k} {have} vs {want})')
        raise UserError(f'{path} does not fit --model {model_name}: ' + '; '.join(parts) +
                        ' -- another architecture or --num-classes?')


def to_plain(value: Any) -> Any:
    """Reduce argument values to types `torch.load(weights_only=True)` and JSON accept."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's arguments as a plain dict (checkpoints, log.json)."""
    return {k: to_plain(v) for k, v in vars(args).items()}


def create_saver(**kwargs: Any):
    """timm's `CheckpointSaver(**kwargs)` writing checkpoints that `torch.load(weights_only=True)` reads."""
    from timm.utils import CheckpointSaver, get_state_dict

    class SafeCheckpointSaver(CheckpointSaver):
        """timm's CheckpointSaver (ranking, best file, history, hard links) writing a weights_only-safe dict.

        timm's own `_save` stores the `argparse.Namespace` of the run, which `torch.load(weights_only=True)`
        rejects; here `args` is stored as a plain dict and everything else is as timm writes it, plus `updates`
        (the optimizer steps taken so far, set by the loop before each save).
        """
        updates: Optional[int] = None

        def _save(self, save_path, epoch, metric=None):
            state = {
                'epoch': epoch,
                'arch': self.args.model,
                'args': plain_args(self.args),
                'optimizer': self.optimizer.state_dict(),
                'version': 2,  # epoch is the finished one; resume starts at epoch + 1 (timm convention)
                'state_dict': get_state_dict(self.model, self.unwrap_fn),
            }
            if self.amp_scaler is not None:
                state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
            if self.model_ema is not None:
                state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
            if metric is not None:
                state['metric'] = metric
            if self.updates is not None:
                state['updates'] = self.updates
            state['saver'] = self.state_dict(epoch, metric)
            write_checkpoint(state, save_path)

        def save_checkpoint(self, epoch, metric=None):
            """timm's save; a failure (disk full, permission) leaves no partial or temporary file behind and is an
            `OSError` naming the file, which the command line reports as one line."""
            tmp = Path(self.checkpoint_dir) / ('tmp' + self.extension)
            try:
                return super().save_checkpoint(epoch, metric)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    return SafeCheckpointSaver(**kwargs)


def write_checkpoint(state: Dict[str, Any], path: str) -> None:
    """`torch.save(state, path)`, atomically: serialised in memory first, so a failed write is the file system's
    `OSError` (torch would report a full disk as a RuntimeError), and written through a temporary sibling that a
    failure removes."""
    import io
    from .._utils.files import atomic_file
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())


def state_checksum(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (sorted by name): equal checksums = identical replicas."""
    from timm.utils import unwrap_model
    h = hashlib.sha256()
    for k, v in sorted(unwrap_model(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_initial_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The weights of `--initial-checkpoint`, read safely (weights_only) and checked to be finite."""
    from ..checkpoints.io import check_finite, read_state_dict
    check_input_file(path, '--initial-checkpoint')
    state_dict, _ = read_state_dict(path)
    check_finite(state_dict, f'--initial-checkpoint {path}')
    return state_dict


def apply_data_config(model: nn.Module, data_config: Dict[str, Any]) -> None:
    """Record the data processing the model was trained with in its `pretrained_cfg` (exported with it)."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'):
        if key in data_config:
            value = data_config[key]
            cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg['num_classes'] = getattr(model, 'num_classes', cfg.get('num_classes'))
    model.pretrained_cfg = cfg


def export_checkpoint(
        checkpoint: Path,
        out_dir: str,
        args: argparse.Namespace,
        data_config: Dict[str, Any],
        label_names: Sequence[str],
        metrics: Dict[str, float],
        use_ema: bool = False,
        world_size: int = 1,
) -> Path:
    """Load the weights of a training checkpoint into a fresh model and export it with `timm_layerattn.hub`.

    The data processing used in training (size, mean, std, crop) is written into the exported `pretrained_cfg`,
    so `resolve_data_config({}, model=reloaded)` reproduces the evaluation transform.
    """
    import timm
    from timm.models import clean_state_dict
    from ..hub import export_folder
    ckpt = read_checkpoint(str(checkpoint))
    key = 'state_dict_ema' if use_ema and 'state_dict_ema' in ckpt else 'state_dict'
    num_classes = args.num_classes or len(label_names)
    model = timm.create_model(args.model, num_classes=num_classes, **(args.model_kwargs or {}))
    model.load_state_dict(clean_state_dict(ckpt[key]))
    apply_data_config(model, data_config)
    dataset = args.dataset or 'imagefolder'
    tag = args.export_tag or re.sub(r'[^A-Za-z0-9_\-]+', '-', dataset.split('/')[-1]).strip('-').lower() or None
    return Path(export_folder(
        model.eval(), out_dir, model_name=args.model.split('.')[0], tag=tag, dataset=dataset, metrics=metrics,
        label_names=list(label_names) if len(label_names) == num_classes else None,
        recipe=recipe_markdown(args, world_size), overwrite=args.overwrite))
