"""The training loop of `timm-layerattn train`: set-up, resume, epochs (train + validate), finish and export.

`train(args)` reads as its four stages: `_setup` builds everything a run needs into one typed `TrainContext`
(device, data, model, optimizer, schedule, loss; resumed state included), `_open_run_log` prepares the run
folder's records, `_train_epochs` trains and validates epoch by epoch, and `_finish` checks the replicas,
exports the best checkpoint and closes the log.

Epochs are numbered from 0 everywhere, as in timm's train.py: the console ("epoch 0 (1 of 2)"), summary.csv,
log.json, the checkpoints' `epoch` field and names (`checkpoint-0.pth.tar`) and the resume line.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .._utils.files import atomic_file, check_writable
from .args import batch_and_lr_line, parse_args, resolve_args
from .checkpoint import (
    CHECKPOINT_EXT, check_checkpoint_matches, create_saver, export_checkpoint, is_run_dir, plain_args,
    read_checkpoint, read_initial_checkpoint, state_checksum, to_plain)
from .data import create_data_config, create_datasets, create_loaders, create_transforms, label_names_of, set_transform

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3, NativeScaler
    from torch.utils.data import DataLoader

__all__ = ['TrainResult', 'TrainingDiverged', 'TrainContext', 'train', 'evaluate', 'create_lr_scheduler',
           'warmup_warning', 'run', 'main']

# The validation metric that ranks checkpoints and picks the exported one.
METRIC_NAME = 'top1'


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN / inf: a matter of the settings (learning rate) or the data, not of the code."""


@dataclass
class TrainResult:
    """What `train` returns: the run's history and where its files are."""
    model_name: str
    output_dir: Path
    history: List[Dict[str, Any]]
    best_metric: Optional[float]
    best_epoch: Optional[int]
    best_checkpoint: Optional[Path]
    num_params: int
    num_classes: int
    label_names: List[str]
    data_config: Dict[str, Any]
    metric_name: str = 'top1'
    export_dir: Optional[Path] = None
    world_size: int = 1
    model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def train_time_per_epoch(self) -> float:
        times = [h['train_time'] for h in self.history]
        return sum(times) / max(len(times), 1)


@dataclass
class TrainContext:
    """Everything a run sets up once, for the epoch loop and the finish; only `updates` advances.

    `model` is what the loop calls (DDP-wrapped when distributed); `unwrapped` is the model itself, which the
    EMA follows, the replica check hashes and the result returns.
    """
    args: argparse.Namespace  # resolved (recipe applied), with timm's distributed fields set
    device: torch.device
    distributed: bool
    rank: int
    world_size: int
    use_amp: bool
    channels_last: bool
    autocast: Callable[[], ContextManager[Any]]
    out_dir: Path
    resuming_here: bool  # resuming from a checkpoint inside `out_dir` (its records are continued)
    train_loader: 'DataLoader'
    val_loader: 'DataLoader'
    label_names: List[str]
    num_classes: int
    data_config: Dict[str, Any]
    num_params: int
    model: nn.Module
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    loss_scaler: Optional['NativeScaler']
    model_ema: Optional['ModelEmaV3']
    lr_scheduler: Optional['Scheduler']
    criterion: nn.Module
    mixup_fn: Optional['Mixup']
    start_epoch: int = 0
    updates: int = 0  # optimizer steps taken so far (resumed runs start at start_epoch * updates_per_epoch)

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def show_bar(self) -> bool:
        return self.is_primary and self.args.progress

    @property
    def updates_per_epoch(self) -> int:
        return len(self.train_loader)

    def say(self, *values: Any, **kwargs: Any) -> None:
        """`print` on the primary rank unless `--quiet`."""
        if self.is_primary and not self.args.quiet:
            print(*values, **kwargs)

    def warn(self, message: str) -> None:
        """A one-line `warning: ...` on the primary rank, on the same console, also under `--quiet`."""
        if self.is_primary:
            print(f'warning: {message}', flush=True)


@dataclass
class RunLog:
    """The run folder's records: per-epoch history, log.json, summary.csv and the checkpoint saver.

    Only the primary rank writes (`saver` is None elsewhere); every rank keeps the history for its result.
    """
    head: Dict[str, Any]  # the run's description, repeated at the top of every log.json write
    log_path: Path
    csv_path: Path
    saver: Optional[Any] = None  # timm CheckpointSaver (see `create_saver`)
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None

    def write(self, finished: bool, **extra: Any) -> None:
        """Rewrite log.json (atomically): head, epochs so far, best epoch."""
        _write_json(self.log_path, dict(self.head, epochs=self.history,
                                        best=dict(epoch=self.best_epoch, top1=self.best_metric),
                                        finished=finished, **extra))


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path, 'w') as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------------------------------------------------------
# Progress, evaluation, one epoch
# ---------------------------------------------------------------------------------------------------------------

class _PlainProgress:
    """Fallback when tqdm is missing: a line at every 10% of the epoch."""

    def __init__(self, iterable, total: int, desc: str, disable: bool = False):
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n, self.postfix, self._next = 0, '', 0.1

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            if not self.disable and self.n / max(self.total, 1) >= self._next - 1e-9:
                print(f'{self.desc}: {self.n}/{self.total} {self.postfix}', file=sys.stderr, flush=True)
                self._next += 0.1

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def progress(iterable, total: int, desc: str, disable: bool = False):
    """A tqdm bar on stderr, or `_PlainProgress` when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, total, desc, disable)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        autocast: Callable = contextlib.nullcontext,
        channels_last: bool = False,
        distributed: bool = False,
) -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole loader; summed exactly over ranks when distributed."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1 hits, top5 hits, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = model(x)
        out = out.float()
        k = min(5, out.shape[-1])
        topk = out.topk(k, dim=-1).indices
        hits = topk == y[:, None]
        totals += torch.stack([
            nn.functional.cross_entropy(out, y, reduction='sum').double(),
            hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), torch.tensor(float(len(y)), device=device,
                                                                                  dtype=torch.float64)])
    if distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {'loss': loss / n, 'top1': 100.0 * top1 / n, 'top5': 100.0 * top5 / n, 'correct': int(top1), 'count': int(n)}


def _train_one_epoch(epoch: int, ctx: TrainContext) -> Dict[str, float]:
    """Train one epoch (or up to `--iters` updates): loss, top-1 (without mixup), time and the last step's lr."""
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad
    args, device, model, optimizer, loader = ctx.args, ctx.device, ctx.model, ctx.optimizer, ctx.train_loader
    model.train()
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.float64, device=device)
    seen, last_lr = 0, optimizer.param_groups[0]['lr']
    start = time.perf_counter()
    bar = progress(loader, len(loader), f'{args.model} epoch {epoch} ({epoch + 1} of {args.epochs})',
                   disable=not ctx.show_bar)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        hard_y = y
        if ctx.mixup_fn is not None:
            x, y = ctx.mixup_fn(x, y)
        with ctx.autocast():
            out = model(x)
            loss = ctx.criterion(out, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f'loss is {loss.item()} at epoch {epoch}, step {ctx.updates + 1}: lower '
                                   f'--lr, add --clip-grad or check the data')
        optimizer.zero_grad(set_to_none=True)
        last_lr = optimizer.param_groups[0]['lr']
        if ctx.loss_scaler is not None:
            ctx.loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model_parameters(model, exclude_head='agc' in args.clip_mode))
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode), args.clip_grad,
                                   mode=args.clip_mode)
            optimizer.step()
        ctx.updates += 1
        if ctx.model_ema is not None:
            ctx.model_ema.update(ctx.unwrapped, step=ctx.updates)
        if ctx.lr_scheduler is not None:
            ctx.lr_scheduler.step_update(num_updates=ctx.updates)
        n = len(hard_y)
        seen += n
        loss_sum += loss.detach().double() * n
        if ctx.mixup_fn is None:
            hits += (out.detach().argmax(-1) == hard_y).sum().double()
        if ctx.show_bar:
            bar.set_postfix_str(f'loss {loss.item():.3f} lr {optimizer.param_groups[0]["lr"]:.4g}', refresh=False)
        if args.iters is not None and ctx.updates >= args.iters:
            break
    bar.close()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    totals = torch.stack([loss_sum, hits, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if ctx.distributed:
        torch.distributed.all_reduce(totals)
    loss_sum, hits, seen = totals.tolist()
    metrics = {'loss': loss_sum / max(seen, 1), 'time': elapsed, 'lr': last_lr}
    if ctx.mixup_fn is None:
        metrics['top1'] = 100.0 * hits / max(seen, 1)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------

def _create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """`timm.create_model` with the command line's model flags and `--initial-checkpoint` (strict, checked)."""
    import timm
    kwargs = dict(args.model_kwargs or {})
    if args.drop is not None:
        kwargs['drop_rate'] = args.drop
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    initial = None
    if args.initial_checkpoint:
        if not Path(args.initial_checkpoint).is_file():
            raise UserError(f'--initial-checkpoint not found: {args.initial_checkpoint}')
        initial = read_initial_checkpoint(args.initial_checkpoint)
    name = args.model
    if ':' not in name and not timm.is_model(name):
        close = timm.list_models(f'*{name.split(".")[0][-12:]}*')[:5]
        raise UserError(f'unknown model {name!r}' + (f' (similar: {", ".join(close)})' if close else '') +
                        '; see `timm-layerattn list`')
    try:
        model = timm.create_model(name, pretrained=args.pretrained, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:  # the constructors' checks of their arguments
        raise UserError(f'cannot create {name} with {kwargs}: {e}') from None
    if initial is not None:  # as timm's `checkpoint_path=` does (strict), with the package's safe reader
        from ..checkpoints.match import check_state_dict
        check_state_dict(initial, model.state_dict(), what=f'--model {name} (--initial-checkpoint)')
        model.load_state_dict(initial, strict=True)
    return model


def create_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, updates_per_epoch: int):
    """timm scheduler for the resolved `args`; `--decay-iters` gives a multistep schedule counted in updates.

    Milestones follow PyTorch's `MultiStepLR` and the papers' code: with `--decay-milestones 100` the lr drops for
    epoch index 100 (the 101st epoch), with `--decay-iters 32000` after 32000 updates. timm's multistep scheduler
    applies a milestone M one step earlier (it compares M with t + 1), so M + 1 is handed to it.
    """
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
    if args.sched == 'multistep' and (args.decay_iters or args.sched_on_updates):
        at = args.decay_iters or [m * updates_per_epoch for m in args.decay_milestones]
        return MultiStepLRScheduler(
            optimizer, decay_t=[m + 1 for m in at], decay_rate=args.decay_rate,
            warmup_t=args.warmup_epochs * updates_per_epoch, warmup_lr_init=args.warmup_lr, warmup_prefix=False,
            t_in_epochs=False)
    milestones = [m + 1 for m in args.decay_milestones] if args.sched == 'multistep' else args.decay_milestones
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=milestones, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
            updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise UserError(f'--sched {args.sched}: {e}') from None
    return scheduler


def warmup_warning(args: argparse.Namespace, updates_per_epoch: int) -> Optional[str]:
    """Why the lr never reaches `--lr` when the linear warm-up lasts as long as the run or longer (with
    `--recipe kcla-cifar --epochs 1` it stays at lr / 100), or None. Counted in the schedule's own steps:
    updates for per-update schedules and `--decay-iters`, else epochs (those `--iters` spans)."""
    if not args.warmup_epochs or args.warmup_lr >= args.lr:
        return None
    if args.sched_on_updates or (args.sched == 'multistep' and args.decay_iters):
        warm = args.warmup_epochs * updates_per_epoch
        total = args.iters if args.iters is not None else args.epochs * updates_per_epoch
    else:
        warm, total = args.warmup_epochs, args.epochs
    if warm < total:
        return None
    peak = args.warmup_lr + (total - 1) * (args.lr - args.warmup_lr) / warm  # the warm-up's last step in the run
    run = f'{args.iters}-step run (--iters)' if args.iters is not None else f'{args.epochs}-epoch run'
    return (f'the {args.warmup_epochs}-epoch warm-up is not shorter than the {run}: the lr rises from '
            f'{args.warmup_lr:g} to at most {peak:.3g} and never reaches {args.lr:g} (lower --warmup-epochs)')


def _init_device(args: argparse.Namespace) -> torch.device:
    """The device of this rank; sets timm's `args.distributed / rank / world_size` (torchrun env) and the seed."""
    from timm.utils import init_distributed_device, random_seed
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev_type = args.device.split(':')[0]
    if dev_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available on this machine')
    try:
        device = init_distributed_device(args)
    except (RuntimeError, ValueError) as e:
        raise UserError(f'cannot set up device {args.device}: {e}') from None
    if args.sync_bn and args.distributed and device.type == 'cpu':
        raise UserError('--sync-bn needs GPUs: torch SyncBatchNorm does not run on CPU')
    random_seed(args.seed, args.rank)
    return device


def _check_outputs(args: argparse.Namespace) -> Tuple[Path, bool]:
    """The run folder (`--output`, defaulted) and whether the run resumes inside it; checked, not created yet.

    Everything that would make the end of the run fail (an unwritable folder, another run's folder, an
    export folder that may not be written) is refused now, before any training.
    """
    if args.output is None:
        if args.resume:
            args.output = str(Path(args.resume).parent)
        else:
            stamp = time.strftime('%Y%m%d-%H%M%S')
            args.output = str(Path('output') / 'train' / f'{stamp}-{args.model.replace("/", "_")}')
    out_dir = Path(args.output)
    check_writable(out_dir, 'output folder')  # without creating it
    resuming_here = bool(args.resume) and Path(args.resume).resolve().parent == out_dir.resolve()
    if is_run_dir(out_dir) and not resuming_here and not args.overwrite:
        raise UserError(f'output folder {out_dir} already holds a training run; choose another --output, '
                        f'--resume from its checkpoint, or pass --overwrite')
    if args.export:
        from ..hub import check_export_dir
        check_export_dir(args.export, args.overwrite, what='export folder')
    return out_dir, resuming_here


def _open_datasets(args: argparse.Namespace, distributed: bool, is_primary: bool):
    """Train and val datasets, their class names and the number of classes the model gets (checked)."""
    train_ds, val_ds = create_datasets(args, distributed, is_primary)
    label_names = label_names_of(train_ds)
    num_classes = args.num_classes or len(label_names)
    if not num_classes:
        raise UserError('cannot tell the number of classes of this dataset; pass --num-classes')
    if label_names and num_classes < len(label_names):
        raise UserError(f'--num-classes {num_classes} is smaller than the {len(label_names)} dataset classes')
    return train_ds, val_ds, label_names, num_classes


def _check_model(model: nn.Module, args: argparse.Namespace, resume_ckpt: Optional[Dict[str, Any]]) -> None:
    """Refuse a model the data cannot feed (input channels) or a `--resume` checkpoint that does not fit it."""
    in_chans = getattr(model, 'in_chans', 3)
    if in_chans != 3 and not (args.dataset or '').lower().startswith('torch/'):
        raise UserError(f'{args.model} takes {in_chans} input channel(s), but this dataset\'s images are loaded as RGB '
                        f'(3 channels); drop in_chans from --model-kwargs')
    if resume_ckpt is not None:
        check_checkpoint_matches(resume_ckpt, model, args.model, args.resume)
        from ..checkpoints.io import check_finite
        check_finite(resume_ckpt['state_dict'], f'--resume checkpoint {args.resume}')


def _place_model(model: nn.Module, args: argparse.Namespace, device: torch.device, channels_last: bool,
                 distributed: bool, is_primary: bool) -> nn.Module:
    """Move the model to its device and memory format; SyncBatchNorm when asked for and distributed."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn and is_primary:
        print('note: --sync-bn has no effect in a single process')
    return model


def _create_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer factory; `--decay-all` puts weight decay on norms and biases too (the papers' setting)."""
    from timm.optim import create_optimizer_v2
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, filter_bias_and_bn=not args.decay_all)
    except (ValueError, AssertionError) as e:  # timm: unknown optimizer name
        raise UserError(f'--opt {args.opt}: {str(e) or type(e).__name__} (names: timm.optim.list_optimizers(); '
                        f'"momentum" = SGD with classical momentum)') from None


def _create_amp(args: argparse.Namespace, device: torch.device,
                use_amp: bool) -> Tuple[Optional['NativeScaler'], Callable[[], ContextManager[Any]]]:
    """The loss scaler (float16 only) and the autocast context of mixed precision; a no-op context without."""
    from timm.utils import NativeScaler
    if not use_amp:
        return None, contextlib.nullcontext
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    return loss_scaler, autocast


def _resume(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_scaler: Optional['NativeScaler'],
        resume_ckpt: Optional[Dict[str, Any]],
        args: argparse.Namespace,
        updates_per_epoch: int,
) -> Tuple[int, int, Optional['ModelEmaV3'], Optional['Scheduler']]:
    """Where the run starts: epoch and update count (0 for a fresh run), with the model, optimizer and scaler
    state of `--resume`, the EMA started from those weights (or the checkpoint's EMA) and the schedule
    advanced to the resumed step."""
    from timm.models import resume_checkpoint
    from timm.utils import ModelEmaV3
    start_epoch, updates = 0, 0
    if resume_ckpt is not None:
        resumed = resume_checkpoint(model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                                    loss_scaler=loss_scaler, log_info=False)
        start_epoch = resumed or 0
        saved = resume_ckpt.get('updates')  # written by this trainer; timm's checkpoints count epochs only
        updates = saved if type(saved) is int and start_epoch > 0 else start_epoch * updates_per_epoch
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
        if resume_ckpt is not None and 'state_dict_ema' in resume_ckpt:
            from timm.models import clean_state_dict
            model_ema.module.load_state_dict(clean_state_dict(resume_ckpt['state_dict_ema']))
    lr_scheduler = create_lr_scheduler(optimizer, args, updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        lr_scheduler.step(start_epoch)
        lr_scheduler.step_update(num_updates=updates)
    return start_epoch, updates, model_ema, lr_scheduler


def _create_loss(args: argparse.Namespace, num_classes: int,
                 device: torch.device) -> Tuple[Optional['Mixup'], nn.Module]:
    """Mixup / CutMix (with soft-target cross-entropy) when asked for, else (label-smoothed) cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                         num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return mixup_fn, criterion.to(device)


def _setup(args: argparse.Namespace) -> TrainContext:
    """Everything the run needs, built in an order that fails fast: device, files and folders, data, model;
    then optimizer, mixed precision, the resumed state, DDP and the loss.

    `args` are as parsed (unresolved): the recipe is applied once the world size is known, since the default
    per-rank batch and the scaled lr depend on it.
    """
    device = _init_device(args)
    args = resolve_args(args, args.world_size)
    distributed, rank, world_size = args.distributed, args.rank, args.world_size
    is_primary = rank == 0
    use_amp = args.amp if args.amp is not None else device.type == 'cuda'
    channels_last = args.channels_last if args.channels_last is not None else device.type == 'cuda'

    resume_ckpt = read_checkpoint(args.resume) if args.resume else None
    out_dir, resuming_here = _check_outputs(args)

    train_ds, val_ds, label_names, num_classes = _open_datasets(args, distributed, is_primary)
    model = _create_model(args, num_classes)
    _check_model(model, args, resume_ckpt)
    data_config = create_data_config(args, model, train_ds)
    train_tf, eval_tf = create_transforms(args, data_config)
    set_transform(train_ds, train_tf)
    set_transform(val_ds, eval_tf)
    train_loader, val_loader = create_loaders(args, train_ds, val_ds, device, distributed, rank, world_size)
    updates_per_epoch = len(train_loader)
    if args.iters is not None:
        args.epochs = math.ceil(args.iters / updates_per_epoch)
    num_params = sum(p.numel() for p in model.parameters())

    model = _place_model(model, args, device, channels_last, distributed, is_primary)
    optimizer = _create_optimizer(model, args)
    loss_scaler, autocast = _create_amp(args, device, use_amp)
    start_epoch, updates, model_ema, lr_scheduler = _resume(
        model, optimizer, loss_scaler, resume_ckpt, args, updates_per_epoch)
    del resume_ckpt  # its tensors are in the model, optimizer and EMA now

    unwrapped = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)
    mixup_fn, criterion = _create_loss(args, num_classes, device)
    return TrainContext(
        args=args, device=device, distributed=distributed, rank=rank, world_size=world_size, use_amp=use_amp,
        channels_last=channels_last, autocast=autocast, out_dir=out_dir, resuming_here=resuming_here,
        train_loader=train_loader, val_loader=val_loader, label_names=label_names, num_classes=num_classes,
        data_config=data_config, num_params=num_params, model=model, unwrapped=unwrapped, optimizer=optimizer,
        loss_scaler=loss_scaler, model_ema=model_ema, lr_scheduler=lr_scheduler, criterion=criterion,
        mixup_fn=mixup_fn, start_epoch=start_epoch, updates=updates)


def _open_run_log(ctx: TrainContext) -> RunLog:
    """Create the run folder (primary rank) and its checkpoint saver; a run resumed in place continues its
    log.json and summary.csv from the resumed epoch, any other starts them afresh."""
    from timm.utils import trim_summary
    args, out_dir = ctx.args, ctx.out_dir
    log = RunLog(head={}, log_path=out_dir / 'log.json', csv_path=out_dir / 'summary.csv')
    if ctx.is_primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not ctx.resuming_here:
            for p in [log.log_path, log.csv_path, *out_dir.glob('*' + CHECKPOINT_EXT)]:
                p.unlink(missing_ok=True)
        log.saver = create_saver(
            model=ctx.model, optimizer=ctx.optimizer, args=args, model_ema=ctx.model_ema, amp_scaler=ctx.loss_scaler,
            checkpoint_dir=str(out_dir), recovery_dir=str(out_dir), decreasing=False,
            max_history=max(1, args.checkpoint_hist))
        if ctx.resuming_here:
            log.saver.load_state_dict_from_checkpoint(args.resume)
            if log.log_path.exists():
                with contextlib.suppress(ValueError, KeyError):
                    log.history = [h for h in json.loads(log.log_path.read_text())['epochs']
                                   if h['epoch'] < ctx.start_epoch]
            trim_summary(str(log.csv_path), ctx.start_epoch)
        else:
            trim_summary(str(log.csv_path), 0)
        log.best_metric, log.best_epoch = log.saver.best_metric, log.saver.best_epoch
    log.head = dict(
        model=args.model, recipe=args.recipe, dataset=args.dataset or 'ImageFolder', world_size=ctx.world_size,
        num_params=ctx.num_params, num_classes=ctx.num_classes, label_names=ctx.label_names,
        data_config=to_plain(ctx.data_config), updates_per_epoch=ctx.updates_per_epoch, args=plain_args(args))
    return log


def _announce(ctx: TrainContext) -> None:
    """What is about to be trained, on what, where to; the global batch and lr; where a resumed run continues;
    a warning for settings that defeat themselves (a warm-up as long as the run, nothing left to train)."""
    args = ctx.args
    ctx.say(f'train {args.model}: {ctx.num_params / 1e6:.3f}M params, {len(ctx.train_loader.dataset)} train / '
            f'{len(ctx.val_loader.dataset)} val images, {ctx.num_classes} classes, {args.epochs} epochs x '
            f'{ctx.updates_per_epoch} steps{f" x {ctx.world_size} ranks" if ctx.distributed else ""}, '
            f'recipe {args.recipe or "(none)"}, device {ctx.device}{", amp " + args.amp_dtype if ctx.use_amp else ""}'
            f' -> {getattr(args, "display_output", None) or ctx.out_dir}')
    ctx.say(batch_and_lr_line(args))
    if args.resume:
        if ctx.start_epoch > 0:
            ctx.say(f'resumed from epoch {ctx.start_epoch - 1}, step {ctx.updates} ({args.resume}): epoch '
                    f'{ctx.start_epoch - 1} was the last finished, training continues with epoch {ctx.start_epoch}')
        else:
            ctx.say(f'resumed the weights of {args.resume} (it records no finished epoch): starting at epoch 0')
    warning = warmup_warning(args, ctx.updates_per_epoch)
    if warning:
        ctx.warn(warning)
    if ctx.start_epoch >= args.epochs or (args.iters is not None and ctx.updates >= args.iters):
        ctx.warn(f'nothing to train: the checkpoint finished epoch {ctx.start_epoch - 1} (step {ctx.updates}) and the '
                 f'run ends ' + (f'at step {args.iters}' if args.iters is not None else
                                 f'after epoch {args.epochs - 1}') + '; raise --epochs / --iters to train on')


# ---------------------------------------------------------------------------------------------------------------
# Epochs and finish
# ---------------------------------------------------------------------------------------------------------------

def _run_epoch(epoch: int, ctx: TrainContext, log: RunLog) -> None:
    """Train one epoch, validate (and the EMA), step the schedule, record the epoch and save the checkpoint."""
    from timm.utils import distribute_bn, update_summary
    args = ctx.args
    train_metrics = _train_one_epoch(epoch, ctx)
    lr = train_metrics.pop('lr')  # the lr of the epoch's last step (per-update schedules change it inside)
    if ctx.distributed:
        distribute_bn(ctx.model, ctx.world_size, reduce=True)  # identical BN statistics on every rank
    t0 = time.perf_counter()
    eval_metrics = evaluate(ctx.model, ctx.val_loader, ctx.device, ctx.autocast, ctx.channels_last, ctx.distributed)
    ema_metrics = None
    if ctx.model_ema is not None:
        if ctx.distributed:
            distribute_bn(ctx.model_ema, ctx.world_size, reduce=True)
        ema_metrics = evaluate(ctx.model_ema, ctx.val_loader, ctx.device, ctx.autocast, ctx.channels_last,
                               ctx.distributed)
    eval_time = time.perf_counter() - t0
    if ctx.lr_scheduler is not None:
        ctx.lr_scheduler.step(epoch + 1, eval_metrics[METRIC_NAME])
    ranked = ema_metrics if ema_metrics is not None else eval_metrics
    row = dict(epoch=epoch, lr=lr, train_loss=train_metrics['loss'], train_top1=train_metrics.get('top1'),
               train_time=train_metrics['time'], eval_loss=eval_metrics['loss'], eval_top1=eval_metrics['top1'],
               eval_top5=eval_metrics['top5'], eval_correct=eval_metrics['correct'],
               eval_count=eval_metrics['count'], eval_time=eval_time, updates=ctx.updates)
    if ema_metrics is not None:
        row.update(ema_loss=ema_metrics['loss'], ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
    log.history.append(row)
    if ctx.is_primary:
        log.saver.updates = ctx.updates  # recorded in the checkpoint for the resume line and `--iters`
        log.best_metric, log.best_epoch = log.saver.save_checkpoint(epoch, metric=ranked[METRIC_NAME])
        update_summary(epoch, {k: v for k, v in train_metrics.items() if k != 'time'},
                       {k: v for k, v in eval_metrics.items() if k in ('loss', 'top1', 'top5')},
                       str(log.csv_path), lr=lr)
        log.write(finished=False)
    ctx.say(f'epoch {epoch} ({epoch + 1} of {args.epochs})  lr {lr:.4g}  train loss {train_metrics["loss"]:.4f}'
            + (f' acc {train_metrics["top1"]:.2f}%' if 'top1' in train_metrics else '')
            + f'  val loss {eval_metrics["loss"]:.4f} top1 {eval_metrics["top1"]:.2f}% '
              f'top5 {eval_metrics["top5"]:.2f}%'
            + (f'  ema top1 {ema_metrics["top1"]:.2f}%' if ema_metrics else '')
            + f'  ({train_metrics["time"]:.1f}s train, {eval_time:.1f}s val)', flush=True)


def _train_epochs(ctx: TrainContext, log: RunLog) -> None:
    """The epochs from `start_epoch` on, until `--epochs`, or `--iters` updates if that comes first."""
    for epoch in range(ctx.start_epoch, ctx.args.epochs):
        if ctx.args.iters is not None and ctx.updates >= ctx.args.iters:
            break
        _run_epoch(epoch, ctx, log)


def _export_best(ctx: TrainContext, log: RunLog, best_checkpoint: Path) -> Path:
    """Export the best checkpoint (its EMA weights when the EMA was ranked) with that epoch's metrics."""
    best_row = next((h for h in log.history if h['epoch'] == log.best_epoch), {})
    prefix = 'ema_' if ctx.model_ema is not None else 'eval_'
    metrics = {k: round(best_row[prefix + k], 3) for k in ('top1', 'top5') if best_row.get(prefix + k) is not None}
    export_dir = export_checkpoint(
        best_checkpoint, ctx.args.export, args=ctx.args, data_config=ctx.data_config, label_names=ctx.label_names,
        metrics=metrics, use_ema=ctx.model_ema is not None, world_size=ctx.world_size)
    ctx.say(f'exported the best checkpoint (epoch {log.best_epoch}, top1 {log.best_metric:.2f}%) '
            f'to {export_dir}')
    return export_dir


def _finish(ctx: TrainContext, log: RunLog) -> TrainResult:
    """Check that the replicas agree, export the best checkpoint if asked, and close the log."""
    checksums = None
    if ctx.distributed:
        checksums = [None] * ctx.world_size
        torch.distributed.all_gather_object(checksums, state_checksum(ctx.unwrapped))
        if len(set(checksums)) != 1:
            raise RuntimeError(f'replicas diverged after training (state checksums {checksums})')
    best_file = ctx.out_dir / ('model_best' + CHECKPOINT_EXT)
    result = TrainResult(
        model_name=ctx.args.model, output_dir=ctx.out_dir, history=log.history, best_metric=log.best_metric,
        best_epoch=log.best_epoch, best_checkpoint=best_file if best_file.exists() else None,
        num_params=ctx.num_params, num_classes=ctx.num_classes, label_names=ctx.label_names,
        data_config=ctx.data_config, metric_name=METRIC_NAME, world_size=ctx.world_size, model=ctx.unwrapped)
    if ctx.is_primary:
        if ctx.args.export and result.best_checkpoint is not None:
            result.export_dir = _export_best(ctx, log, result.best_checkpoint)
        log.write(finished=True, replica_checksums=checksums,
                  export_dir=str(result.export_dir) if result.export_dir else None)
    if ctx.distributed:
        torch.distributed.barrier()
    return result


def train(args: argparse.Namespace) -> TrainResult:
    """Run a training as configured by `args` (from `add_arguments`; recipes resolved here)."""
    resolve_args(args)  # a bad recipe or value fails here, before any process group, folder or dataset
    ctx = _setup(copy.copy(args))
    log = _open_run_log(ctx)
    _announce(ctx)
    _train_epochs(ctx, log)
    return _finish(ctx, log)


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """CLI entry (`timm-layerattn train`)."""
    result = train(args)
    if result.best_metric is not None and (not args.quiet) and int(os.environ.get('RANK', 0)) == 0:
        which = 'EMA top1' if args.model_ema else 'top1'
        print(f'best {which} {result.best_metric:.2f}% at epoch {result.best_epoch}; '
              f'checkpoint {result.best_checkpoint}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m timm_layerattn.train` (what torchrun launches on every rank)."""
    from ..cli import run_reporting_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    args = parse_args([a for a in argv if a != '--debug'])
    try:
        return run_reporting_errors('timm-layerattn train', lambda: run(args), debug=debug)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
