"""The training loop of `timm-layerattn train`: epochs (train + validate), finish and export.

`train(args)` reads as its four stages: `setup.setup` builds everything a run needs into one typed `TrainContext`
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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .._utils.files import atomic_file
from .args import batch_and_lr_line, parse_args, resolve_args
from .checkpoint import CHECKPOINT_EXT, create_saver, export_checkpoint, plain_args, state_checksum, to_plain
from .setup import TrainContext, setup, warmup_warning

__all__ = ['TrainResult', 'TrainingDiverged', 'train', 'evaluate', 'run', 'main']

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
# Run folder and announcement
# ---------------------------------------------------------------------------------------------------------------

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
            if ctx.resume_saver is not None:  # read with the checkpoint by the package's one reader
                log.saver.load_state_dict(ctx.resume_saver)
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
    ctx = setup(copy.copy(args))
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
