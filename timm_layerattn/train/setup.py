"""The set-up of `timm-layerattn train`: everything a run builds once, as one typed `TrainContext`.

`setup(args)` resolves the arguments (the recipe, once the world size is known) and builds, in an order that
fails fast: the device (and timm's distributed fields), the run and export folders (checked, not created), the
datasets, the model (`--initial-checkpoint` loaded strictly), transforms and loaders, then the optimizer, mixed
precision, the state of `--resume` (model, optimizer, scaler, EMA, schedule advanced to the resumed step), DDP
and the loss. The epoch loop (`loop.py`) only reads the context, except `updates`, which it advances.
"""
import argparse
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError
from .._utils.files import check_writable
from .args import resolve_args
from .checkpoint import check_checkpoint_matches, is_run_dir, read_checkpoint, read_initial_checkpoint
from .data import create_data_config, create_datasets, create_loaders, create_transforms, label_names_of, set_transform

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3, NativeScaler
    from torch.utils.data import DataLoader

__all__ = ['TrainContext', 'setup', 'create_lr_scheduler', 'warmup_warning']


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
    resume_saver: Optional[Dict[str, Any]] = None  # the checkpoint saver's records in the `--resume` checkpoint

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
    if label_names and len(label_names) < 2:
        raise UserError(f'the training data holds {len(label_names)} class{"" if len(label_names) == 1 else "es"} '
                        f'({", ".join(label_names) or "none"}); a classifier needs at least 2 (one sub-folder per '
                        f'class)')
    if num_classes < 2:
        raise UserError(f'--num-classes {num_classes}: a classifier needs at least 2 classes')
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
        extra = {} if args.opt_eps is None else {'eps': args.opt_eps}
        return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, filter_bias_and_bn=not args.decay_all, **extra)
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


def _saved_arg(ckpt: Dict[str, Any], name: str) -> Any:
    """An argument of the run that wrote `ckpt` (a plain dict here, timm train.py's Namespace), or None."""
    saved = ckpt.get('args')
    return saved.get(name) if isinstance(saved, dict) else getattr(saved, name, None)


def _optimizer_misfit(optimizer: torch.optim.Optimizer, saved: Any, saved_opt: Any, opt: str) -> Optional[str]:
    """Why the optimizer state `saved` cannot be restored into `optimizer` (None: it fits)."""
    if not isinstance(saved, dict) or not isinstance(saved.get('param_groups'), list):
        return 'the checkpoint holds none'
    if isinstance(saved_opt, str) and saved_opt.lower() != opt.lower():
        return f'the checkpoint\'s run used --opt {saved_opt}, this one --opt {opt}'
    groups = optimizer.state_dict()['param_groups']
    if [len(g.get('params', ())) for g in saved['param_groups']] != [len(g['params']) for g in groups]:
        return 'its parameter groups differ (another --decay-all setting or model?)'
    # the optimizer's settings must all be there (a scheduler adds its own, e.g. `initial_lr`, to the saved groups)
    if not all(set(g) <= set(h) for g, h in zip(groups, saved['param_groups'])):
        return f'it is the state of another optimizer than --opt {opt}'
    return None


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, loss_scaler: Optional['NativeScaler'],
             ckpt: Dict[str, Any], args: argparse.Namespace, is_primary: bool) -> int:
    """Load the `--resume` checkpoint (read once, by the package's reader) into the model, the optimizer and the
    loss scaler, as timm's `resume_checkpoint` does; what does not fit this run (another optimizer) is reset and
    said in one line. Returns the epoch to start at."""
    from timm.models import clean_state_dict
    model.load_state_dict(clean_state_dict(ckpt['state_dict']))
    reset = []
    if not args.no_resume_opt:
        why = _optimizer_misfit(optimizer, ckpt.get('optimizer'), _saved_arg(ckpt, 'opt'), args.opt)
        if why is None:
            before = optimizer.state_dict()
            try:
                optimizer.load_state_dict(ckpt['optimizer'])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                optimizer.load_state_dict(before)
                why = f'it does not fit ({type(e).__name__}: {e})'
        if why is not None:
            reset.append(f'the optimizer state ({why})')
    if loss_scaler is not None and loss_scaler.state_dict_key in ckpt:
        loss_scaler.load_state_dict(ckpt[loss_scaler.state_dict_key])
    saved_sched = _saved_arg(ckpt, 'sched')
    if isinstance(saved_sched, str) and saved_sched != args.sched:
        reset.append(f'the lr schedule (--sched {args.sched} from the resumed epoch on; the checkpoint\'s run used '
                     f'{saved_sched})')
    if reset and is_primary:
        print(f'note: --resume {args.resume}: restored the weights and the epoch; reset ' + '; '.join(reset),
              flush=True)
    epoch = ckpt.get('epoch')
    if type(epoch) is not int:
        return 0
    return epoch + 1 if type(ckpt.get('version')) is int and ckpt['version'] > 1 else epoch


def _resume(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_scaler: Optional['NativeScaler'],
        resume_ckpt: Optional[Dict[str, Any]],
        args: argparse.Namespace,
        updates_per_epoch: int,
        is_primary: bool = True,
) -> Tuple[int, int, Optional['ModelEmaV3'], Optional['Scheduler']]:
    """Where the run starts: epoch and update count (0 for a fresh run), with the model, optimizer and scaler
    state of `--resume` (`_restore`), the EMA started from those weights (or the checkpoint's EMA) and the
    schedule advanced to the resumed step."""
    from timm.utils import ModelEmaV3
    start_epoch, updates = 0, 0
    if resume_ckpt is not None:
        start_epoch = _restore(model, optimizer, loss_scaler, resume_ckpt, args, is_primary)
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


def setup(args: argparse.Namespace) -> TrainContext:
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
        model, optimizer, loss_scaler, resume_ckpt, args, updates_per_epoch, is_primary)
    resume_saver = resume_ckpt.get('saver') if resume_ckpt is not None else None
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
        mixup_fn=mixup_fn, start_epoch=start_epoch, updates=updates,
        resume_saver=resume_saver if isinstance(resume_saver, dict) else None)
