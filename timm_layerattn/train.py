"""`timm-layerattn train`: train a model with the papers' recipes, built from timm's training parts.

Data (`timm.data.create_dataset` + timm transforms, plus the embedded digits set and the CIFAR pad-and-crop
augmentation of `timm_layerattn.data`), optimizer (`create_optimizer_v2`), schedule (`create_scheduler_v2`),
loss (`timm.loss`), EMA (`ModelEmaV3`), checkpoints (`CheckpointSaver`) and distributed set-up
(`init_distributed_device`, `distribute_bn`) all come from timm; this module wires them together with the
layer-attention papers' recipes (`--recipe`), a progress bar, a per-epoch CSV/JSON log and an export of
the best model to a Hub-ready folder.

Single process:   timm-layerattn train --recipe kcla-cifar --model cifar_resnet56_kcla \
                      --dataset torch/cifar10 --dataset-download data/cifar10
Distributed:      torchrun --nproc_per_node 8 -m timm_layerattn.train --recipe la-imagenet \
                      --model resnet50_kcla /data/imagenet --sync-bn

Checkpoints are plain dicts of tensors and Python scalars: they load with `torch.load(..., weights_only=True)`.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._utils import UserError, atomic_file, check_writable, float_arg, int_arg

__all__ = ['RECIPES', 'TrainResult', 'TrainingDiverged', 'add_arguments', 'resolve_args', 'train', 'run', 'main',
           'evaluate',
           'export_checkpoint', 'parse_args']

# ---------------------------------------------------------------------------------------------------------------
# Recipes. Keys are argument names (`dest`); every value can be overridden on the command line.
# ---------------------------------------------------------------------------------------------------------------

# Defaults without --recipe: plain SGD-momentum with a cosine schedule and timm's standard augmentation.
BASE_DEFAULTS: Dict[str, Any] = dict(
    dataset='', opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, decay_all=False,
    batch_size=128, epochs=100, iters=None, sched='cosine', sched_on_updates=False,
    decay_milestones=[30, 60, 90], decay_epochs=30.0, decay_iters=None, decay_rate=0.1,
    warmup_epochs=0, warmup_lr=1e-4, min_lr=0.0, smoothing=0.0,
    train_aug='timm', hflip=0.5, pad=4, color_jitter=0.4, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3],
)

# The CIFAR recipe stated in the KCLA and MRLA papers (layer_attention.md §10): SGD with classical momentum
# (timm's 'momentum'; its 'sgd' is Nesterov), weight decay on every parameter, 10-epoch linear warm-up from 0.001.
_LA_CIFAR = dict(
    opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, decay_all=True, batch_size=128, epochs=180,
    sched='multistep', decay_milestones=[100, 150], decay_rate=0.1, warmup_epochs=10, warmup_lr=1e-3,
    smoothing=0.0, train_aug='cifar', hflip=0.5, pad=4,
)

# The ImageNet recipe of the official KCLA / MRLA train.py (layer_attention.md §10): batch 256, lr 0.1, 100 epochs,
# 3-epoch linear warm-up from 1e-4, RandomResizedCrop + flip only (no colour jitter), no label smoothing.
_LA_IMAGENET = dict(
    opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, decay_all=True, batch_size=256, epochs=100,
    sched='step', decay_epochs=30.0, decay_rate=0.1, warmup_epochs=3, warmup_lr=1e-4,
    smoothing=0.0, train_aug='timm', hflip=0.5, color_jitter=0.0, scale=[0.08, 1.0],
)

RECIPES: Dict[str, Dict[str, Any]] = {
    'kcla-cifar': dict(_LA_CIFAR),
    'mrla-cifar': dict(_LA_CIFAR),
    # Attention Shortcuts (attention_shortcuts.md §7): the 2016 ResNet CIFAR recipe, 64k iterations at batch 128
    # (164 epochs of 391 steps), lr / 10 at 32k and 48k iterations, no warm-up.
    'as-cifar': dict(
        opt='momentum', lr=0.1, momentum=0.9, weight_decay=1e-4, decay_all=True, batch_size=128,
        iters=64000, sched='multistep', decay_iters=[32000, 48000], decay_rate=0.1, warmup_epochs=0,
        smoothing=0.0, train_aug='cifar', hflip=0.5, pad=4,
    ),
    # MRLA's decay: x0.1 every 30 epochs.
    'la-imagenet': dict(_LA_IMAGENET),
    'mrla-imagenet': dict(_LA_IMAGENET),
    # KCLA's decay: x0.1 at 40, x0.01 at 70, x0.001 at 90.
    'kcla-imagenet': dict(_LA_IMAGENET, sched='multistep', decay_milestones=[40, 70, 90]),
    # The demo's recipe for the embedded 8x8 digits (32x32 upscaled): short, no flips (digits are not
    # mirror-symmetric), the CIFAR pad-and-crop as the only augmentation.
    'digits': dict(
        dataset='digits', opt='adamw', lr=2e-3, weight_decay=0.05, decay_all=False, batch_size=32, epochs=5,
        sched='cosine', sched_on_updates=True, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5,
        smoothing=0.0, train_aug='cifar', hflip=0.0, pad=4,
    ),
}

RECIPE_HELP = {
    'kcla-cifar': 'KCLA paper CIFAR: SGD 0.1 m0.9, wd 1e-4, b128, 180 ep, 10-ep warm-up from 1e-3, x0.1 at 100/150',
    'mrla-cifar': 'MRLA paper CIFAR: same as kcla-cifar',
    'as-cifar': 'Attention Shortcuts CIFAR: SGD 0.1 m0.9, wd 1e-4, b128, 64k iters, x0.1 at 32k/48k iters',
    'la-imagenet': 'layer-attention ImageNet (MRLA decay): SGD 0.1, b256, 100 ep, 3-ep warm-up, x0.1 every 30 ep',
    'mrla-imagenet': 'same as la-imagenet',
    'kcla-imagenet': 'la-imagenet with KCLA decay: x0.1 at 40, 70, 90',
    'digits': 'the demo: embedded 8x8 digits at 32 px, AdamW 2e-3, wd 0.05, b32, 5 ep cosine, pad-4 crop, no flip',
}

CHECKPOINT_EXT = '.pth.tar'

# Argument types (`timm_layerattn._utils`): out-of-range values are refused at parse time, naming the flag.
POS_INT = int_arg(min=1)
POS_FLOAT = float_arg(min=0, min_open=True)
NONNEG_FLOAT = float_arg(min=0)
PROB = float_arg(0, 1)
PROB_OPEN = float_arg(0, 1, max_open=True)
SEED = int_arg(0, 2 ** 31 - 1)  # NumPy takes seeds below 2**32; rank offsets are added


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


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------

class _ParseKwargs(argparse.Action):
    """`K=V ...` -> dict, values as Python literals where they parse (else strings), like timm's `ParseKwargs`,
    but a malformed item is a usage error naming the flag (timm's raises a bare ValueError)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        kwargs = {}
        for item in values:
            key, sep, value = item.partition('=')
            if not sep or not key.isidentifier():
                parser.error(f'argument {option_string}: expected KEY=VALUE with a Python name as KEY, got {item!r}')
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = str(value)
        setattr(namespace, self.dest, kwargs)


INTERPOLATIONS = ('', 'bilinear', 'bicubic', 'nearest', 'lanczos', 'hamming', 'box', 'random')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = 'recipes (--recipe; any flag overrides a recipe value):\n' + '\n'.join(
        f'  {k:<14} {v}' for k, v in RECIPE_HELP.items())
    R = ' (default: from --recipe)'

    g = parser.add_argument_group('data')
    g.add_argument('data_dir', nargs='?', default=None, metavar='DATA_DIR',
                   help='dataset root: an ImageFolder with train/ and val/ (or validation/) sub-folders, or the '
                        'download folder of a torch/ dataset; not needed for --dataset digits')
    g.add_argument('--data-dir', dest='data_dir_opt', default=None, metavar='DIR', help='same as DATA_DIR')
    g.add_argument('--dataset', '-d', default=None, metavar='NAME',
                   help='"" = ImageFolder/ImageTar, "digits" = embedded sklearn digits, or any timm create_dataset '
                        'name such as torch/cifar10, torch/cifar100' + R)
    g.add_argument('--train-split', default='train', help='train split (default: train)')
    g.add_argument('--val-split', default='validation', help='validation split (default: validation)')
    g.add_argument('--dataset-download', action='store_true', help='download torch/ datasets if missing')
    g.add_argument('--class-map', default='', metavar='FILE', help='class -> index mapping file (ImageFolder)')
    g.add_argument('--train-samples', type=POS_INT, default=None, metavar='N',
                   help='train on a fixed random subset of N images (quick runs)')
    g.add_argument('--val-samples', type=POS_INT, default=None, metavar='N',
                   help='validate on a fixed random subset of N images')
    g.add_argument('--workers', '-j', type=int_arg(min=0), default=None, metavar='N',
                   help='data loader processes per rank (default: 0 for in-memory digits, else min(4, cores))')

    g = parser.add_argument_group('model')
    g.add_argument('--model', required=True, metavar='NAME', help='model name, e.g. cifar_resnet20_kcla')
    g.add_argument('--pretrained', action='store_true', help='start from the pretrained weights')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='initialise the model from a checkpoint')
    g.add_argument('--num-classes', type=POS_INT, default=None, metavar='N', help='default: number of dataset classes')
    g.add_argument('--drop', type=PROB_OPEN, default=None, metavar='P', help='classifier dropout')
    g.add_argument('--drop-path', type=PROB_OPEN, default=None, metavar='P', help='stochastic depth rate')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=_ParseKwargs, metavar='K=V',
                   help='extra create_model keyword arguments')
    g.add_argument('--img-size', type=POS_INT, default=None, metavar='N', help='input size (default: model cfg)')
    g.add_argument('--input-size', type=POS_INT, nargs=3, default=None, metavar=('C', 'H', 'W'))
    g.add_argument('--mean', type=float_arg(), nargs='+', default=None, metavar='M', help='normalisation mean')
    g.add_argument('--std', type=POS_FLOAT, nargs='+', default=None, metavar='S', help='normalisation std')
    g.add_argument('--crop-pct', type=float_arg(0, 1, min_open=True), default=None,
                   help='eval center-crop fraction (default: model cfg)')
    g.add_argument('--interpolation', default='', choices=INTERPOLATIONS, metavar='MODE',
                   help='resize interpolation: ' + ', '.join(INTERPOLATIONS[1:]) + ' (default: model cfg)')

    g = parser.add_argument_group('recipe, optimizer and schedule')
    g.add_argument('--recipe', default=None, metavar='NAME', help='preset: ' + ', '.join(RECIPES))
    g.add_argument('--opt', default=None, help='timm optimizer name; "momentum" = SGD with classical momentum' + R)
    g.add_argument('--lr', type=POS_FLOAT, default=None, help='base learning rate' + R)
    g.add_argument('--momentum', type=PROB_OPEN, default=None, help='optimizer momentum' + R)
    g.add_argument('--weight-decay', '--wd', type=NONNEG_FLOAT, default=None, help='weight decay' + R)
    g.add_argument('--decay-all', action=argparse.BooleanOptionalAction, default=None,
                   help='weight decay on norms and biases too (the papers\' setting)' + R)
    g.add_argument('--clip-grad', type=POS_FLOAT, default=None, metavar='NORM', help='gradient clipping')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                   help='norm, value or agc (default: norm)')
    g.add_argument('--batch-size', '-b', type=POS_INT, default=None, metavar='N', help='batch size per rank' + R)
    g.add_argument('--validation-batch-size', '-vb', type=POS_INT, default=None, metavar='N',
                   help='validation batch size (default: the training batch size)')
    g.add_argument('--epochs', type=POS_INT, default=None, help='epochs to train' + R)
    g.add_argument('--iters', type=POS_INT, default=None, metavar='N',
                   help='stop after N optimizer steps instead (the epoch count follows)' + R)
    g.add_argument('--sched', default=None, help='timm scheduler: cosine, step, multistep, ...' + R)
    g.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=None,
                   help='step the schedule every update instead of every epoch' + R)
    g.add_argument('--decay-milestones', type=int_arg(min=0), nargs='+', default=None, metavar='EPOCH',
                   help='multistep: epoch indices from which the lr is decayed (PyTorch MultiStepLR timing)' + R)
    g.add_argument('--decay-epochs', type=POS_FLOAT, default=None, help='step decay interval' + R)
    g.add_argument('--decay-iters', type=POS_INT, nargs='+', default=None, metavar='ITER',
                   help='multistep: decay after this many optimizer steps (overrides --decay-milestones)' + R)
    g.add_argument('--decay-rate', type=float_arg(0, 1, min_open=True), default=None, help='lr decay factor' + R)
    g.add_argument('--warmup-epochs', type=int_arg(min=0), default=None, help='linear warm-up epochs' + R)
    g.add_argument('--warmup-lr', type=NONNEG_FLOAT, default=None, help='warm-up start lr' + R)
    g.add_argument('--min-lr', type=NONNEG_FLOAT, default=None, help='cosine floor' + R)

    g = parser.add_argument_group('augmentation and regularisation')
    g.add_argument('--train-aug', default=None, choices=('timm', 'cifar', 'none'),
                   help='"cifar" = the papers\' pad-and-random-crop + flip; "timm" = timm\'s RandomResizedCrop '
                        'pipeline; "none" = eval transform' + R)
    g.add_argument('--pad', type=int_arg(min=0), default=None, help='padding of the cifar crop' + R)
    g.add_argument('--hflip', type=PROB, default=None, help='horizontal flip probability' + R)
    g.add_argument('--color-jitter', type=NONNEG_FLOAT, default=None, help='timm aug colour jitter' + R)
    g.add_argument('--scale', type=float_arg(0, 1, min_open=True), nargs=2, default=None,
                   help='timm aug RandomResizedCrop scale' + R)
    g.add_argument('--ratio', type=POS_FLOAT, nargs=2, default=None, help='timm aug RandomResizedCrop ratio' + R)
    g.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--reprob', type=PROB, default=0.0, help='random erasing probability (timm aug)')
    g.add_argument('--smoothing', type=PROB_OPEN, default=None, help='label smoothing' + R)
    g.add_argument('--mixup', type=NONNEG_FLOAT, default=0.0, help='mixup alpha (0 = off)')
    g.add_argument('--cutmix', type=NONNEG_FLOAT, default=0.0, help='cutmix alpha (0 = off)')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (ModelEmaV3); the EMA '
                                                            'is validated, ranked and exported')
    g.add_argument('--model-ema-decay', type=PROB_OPEN, default=0.9998)

    g = parser.add_argument_group('device and distributed')
    g.add_argument('--device', default=None, help='cuda, cpu, ... (default: cuda if available)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='mixed precision (default: on for CUDA, off on CPU)')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels_last memory format (default: on for CUDA)')
    g.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm across ranks (distributed, GPU)')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--seed', type=SEED, default=42)

    g = parser.add_argument_group('output')
    g.add_argument('--output', '-o', default=None, metavar='DIR',
                   help='run folder (default: output/train/<time>-<model>; with --resume: the checkpoint\'s folder)')
    g.add_argument('--overwrite', action='store_true', help='replace a previous run in --output / --export')
    g.add_argument('--resume', default='', metavar='CKPT', help='resume model, optimizer and epoch from a checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer state')
    g.add_argument('--checkpoint-hist', type=POS_INT, default=1, metavar='N', help='best epoch checkpoints to keep')
    g.add_argument('--export', default=None, metavar='DIR',
                   help='at the end, export the best checkpoint to this Hub-ready folder')
    g.add_argument('--export-tag', default=None, help='pretrained tag of the export (default: <dataset>)')
    g.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='progress bar')
    g.add_argument('--quiet', action='store_true', help='no per-epoch lines')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='timm-layerattn train', description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset (None) arguments from the recipe, then from the base defaults; validate the combination."""
    args = copy.copy(args)
    if args.recipe is not None and args.recipe not in RECIPES:
        raise UserError(f'unknown recipe {args.recipe!r}; choose one of: {", ".join(RECIPES)}')
    recipe = RECIPES.get(args.recipe, {})
    for key, base in BASE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.copy(recipe.get(key, base)))
    if getattr(args, 'data_dir_opt', None):
        if args.data_dir and args.data_dir != args.data_dir_opt:
            raise UserError('give the dataset folder once: as DATA_DIR or as --data-dir')
        args.data_dir = args.data_dir_opt
    for name in ('batch_size', 'epochs'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be >= 1')
    if args.iters is not None and args.iters < 1:
        raise UserError('--iters must be >= 1')
    if args.lr <= 0:
        raise UserError('--lr must be > 0')
    return args


# ---------------------------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------------------------

def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ('log.json', 'summary.csv', 'last' + CHECKPOINT_EXT))


def _subset(dataset, n: Optional[int], seed: int):
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise UserError('--train-samples / --val-samples must be >= 1')
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    return torch.utils.data.Subset(dataset, idx)


def label_names_of(dataset) -> List[str]:
    """Class names of a timm / torchvision / digits dataset (index order), or [] if it has none."""
    ds = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(ds, 'class_to_idx', None)
    if class_to_idx:
        return [str(c) for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    classes = getattr(ds, 'classes', None)
    return [str(c) for c in classes] if classes else []


def set_transform(dataset, transform: Callable) -> None:
    ds = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    ds.transform = transform


def create_datasets(args: argparse.Namespace, distributed: bool = False, is_primary: bool = True):
    """Train and validation datasets (transforms are attached later, once the model's data config is known)."""
    name = args.dataset or ''
    from .data import DigitsDataset, is_embedded_dataset
    if is_embedded_dataset(name):
        train_ds = DigitsDataset('train')
        val_ds = DigitsDataset(args.val_split)
    else:
        from timm.data import create_dataset
        root = args.data_dir
        is_torch = name.lower().startswith('torch/')
        if name and '/' not in name:
            raise UserError(f'unknown dataset {name!r}: use "" (ImageFolder), "digits", or a timm dataset name such as '
                            f'torch/cifar10, torch/cifar100')
        if not root:
            raise UserError('no dataset folder given (DATA_DIR); use --dataset digits for the embedded data')
        if not Path(root).exists() and not (is_torch and args.dataset_download):
            hint = ' (add --dataset-download to fetch it)' if is_torch else ''
            raise UserError(f'dataset folder not found: {root}{hint}')
        if args.class_map and not Path(args.class_map).is_file():
            raise UserError(f'--class-map file not found: {args.class_map}')

        def make(split: str, training: bool):
            kwargs = dict(root=root, split=split, is_training=training, class_map=args.class_map,
                          download=args.dataset_download, batch_size=args.batch_size, seed=args.seed)
            try:
                return create_dataset(name, **kwargs)
            except (RuntimeError, FileNotFoundError, AssertionError, ValueError, OSError) as e:
                raise UserError(f'cannot open dataset {name or "ImageFolder"!r} split {split!r} at {root}: '
                                f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None

        if distributed and args.dataset_download:
            # One rank downloads, the others wait and then open the finished copy.
            if is_primary:
                make(args.train_split, True), make(args.val_split, False)
            torch.distributed.barrier()
        train_ds = make(args.train_split, True)
        val_ds = make(args.val_split, False)
        roots = [getattr(getattr(ds, 'reader', None), 'root', None) for ds in (train_ds, val_ds)]
        if roots[0] is not None and roots[0] == roots[1]:
            raise UserError(f'{root} has no {args.train_split!r} / {args.val_split!r} sub-folders: training and '
                            f'validation would use the same images (give --train-split / --val-split)')
        if isinstance(train_ds, torch.utils.data.IterableDataset):
            raise UserError(f'{name} is a streaming dataset; use timm\'s train.py with --device-modules '
                            f'timm_layerattn for those')
    train_ds = _subset(train_ds, args.train_samples, args.seed)
    val_ds = _subset(val_ds, args.val_samples, args.seed + 1)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError(f'empty dataset: {len(train_ds)} train / {len(val_ds)} validation images')
    return train_ds, val_ds


def create_transforms(args: argparse.Namespace, data_config: Dict[str, Any]) -> Tuple[Callable, Callable]:
    from timm.data import create_transform
    from .data import cifar_train_transform
    eval_tf = create_transform(**data_config, is_training=False)
    img_size = data_config['input_size'][-1]
    if args.train_aug == 'cifar':
        train_tf = cifar_train_transform(img_size, data_config['mean'], data_config['std'], args.pad, args.hflip)
    elif args.train_aug == 'timm':
        try:
            train_tf = create_transform(
                **data_config, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob)
        except (AssertionError, ValueError, KeyError) as e:  # timm's checks of the policy strings
            raise UserError(f'--aa {args.aa!r}: {str(e) or type(e).__name__} (timm policies look like '
                            f'rand-m9-mstd0.5, augmix-m5-w4-d2, v0)') from None
    else:
        train_tf = eval_tf
    return train_tf, eval_tf


class _ShardedEval(torch.utils.data.Sampler):
    """Rank r evaluates items r, r + W, r + 2W, ...: an exact partition (no padding, no duplicates)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def create_loaders(args, train_ds, val_ds, device: torch.device, distributed: bool, rank: int, world_size: int):
    from torch.utils.data import DataLoader, DistributedSampler
    workers = args.workers
    if workers is None:
        from .data import is_embedded_dataset
        workers = 0 if is_embedded_dataset(args.dataset) else min(4, os.cpu_count() or 1)
    common = dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0)
    if distributed:
        train_sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        per_rank = len(train_sampler)
    else:
        train_sampler = None
        per_rank = len(train_ds)
    # A last batch of one image breaks BatchNorm in training: drop it in that case only.
    drop_last = per_rank % args.batch_size == 1
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=train_sampler is None,
                              sampler=train_sampler, drop_last=drop_last, **common)
    val_sampler = _ShardedEval(len(val_ds), rank, world_size) if distributed else None
    val_loader = DataLoader(val_ds, batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
                            sampler=val_sampler, **common)
    if len(train_loader) == 0:
        raise UserError(f'--batch-size {args.batch_size} leaves no full training batch for {per_rank} images per rank')
    return train_loader, val_loader


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a training checkpoint safely (weights_only; timm's argparse `args` allowed) or raise UserError."""
    if not Path(path).is_file():
        raise UserError(f'--resume checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # any unreadable / unsafe file is the user's input problem here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read checkpoint {path}: {msg}') from None
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt:
        raise UserError(f'{path} is not a training checkpoint (no "state_dict" entry)')
    return ckpt


def check_checkpoint_matches(ckpt: Dict[str, Any], model: nn.Module, model_name: str, path: str) -> None:
    """Raise UserError unless `ckpt` holds weights of exactly this architecture (names and shapes)."""
    from timm.models import clean_state_dict
    arch = ckpt.get('arch')
    if isinstance(arch, str) and arch and arch != model_name:
        raise UserError(f'{path} is a checkpoint of {arch!r}, not of --model {model_name!r}')
    state = clean_state_dict(ckpt['state_dict'])
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing (e.g. {missing[0]})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]})')
        if shapes:
            parts.append(f'{len(shapes)} with other shapes (e.g. {shapes[0]})')
        raise UserError(f'{path} does not fit --model {model_name}: ' + '; '.join(parts) +
                        ' -- another architecture or --num-classes?')


def _plain(value: Any) -> Any:
    """Reduce argument values to types `torch.load(weights_only=True)` and JSON accept."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: _plain(v) for k, v in vars(args).items()}


def _safe_saver_cls():
    from timm.utils import CheckpointSaver, get_state_dict

    class SafeCheckpointSaver(CheckpointSaver):
        """timm's CheckpointSaver (ranking, best file, history, hard links) writing a weights_only-safe dict.

        timm's own `_save` stores the `argparse.Namespace` of the run, which `torch.load(weights_only=True)`
        rejects; here `args` is stored as a plain dict and everything else is as timm writes it.
        """

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
            state['saver'] = self.state_dict(epoch, metric)
            torch.save(state, save_path)

    return SafeCheckpointSaver


def state_checksum(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (sorted by name): equal checksums = identical replicas."""
    from timm.utils import unwrap_model
    h = hashlib.sha256()
    for k, v in sorted(unwrap_model(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(iterable, total, desc, disable)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------

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


def _train_one_epoch(
        epoch: int, model, loader, optimizer, criterion, lr_scheduler, state: Dict[str, Any], ctx: Dict[str, Any],
) -> Dict[str, float]:
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad
    args, device = ctx['args'], ctx['device']
    model.train()
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    hits = torch.zeros((), dtype=torch.float64, device=device)
    seen, last_lr = 0, optimizer.param_groups[0]['lr']
    start = time.perf_counter()
    bar = progress(loader, len(loader), f'{args.model} {epoch + 1}/{ctx["num_epochs"]}', disable=not ctx['show_bar'])
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if ctx['channels_last']:
            x = x.contiguous(memory_format=torch.channels_last)
        hard_y = y
        if ctx['mixup_fn'] is not None:
            x, y = ctx['mixup_fn'](x, y)
        with ctx['autocast']():
            out = model(x)
            loss = criterion(out, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f'loss is {loss.item()} at epoch {epoch + 1}, step {state["updates"] + 1}: lower '
                                   f'--lr, add --clip-grad or check the data')
        optimizer.zero_grad(set_to_none=True)
        last_lr = optimizer.param_groups[0]['lr']
        if ctx['loss_scaler'] is not None:
            ctx['loss_scaler'](loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                               parameters=model_parameters(model, exclude_head='agc' in args.clip_mode))
        else:
            loss.backward()
            if args.clip_grad is not None:
                dispatch_clip_grad(model_parameters(model, exclude_head='agc' in args.clip_mode), args.clip_grad,
                                   mode=args.clip_mode)
            optimizer.step()
        state['updates'] += 1
        if ctx['model_ema'] is not None:
            ctx['model_ema'].update(ctx['unwrapped'], step=state['updates'])
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=state['updates'])
        n = len(hard_y)
        seen += n
        loss_sum += loss.detach().double() * n
        if ctx['mixup_fn'] is None:
            hits += (out.detach().argmax(-1) == hard_y).sum().double()
        if ctx['show_bar']:
            bar.set_postfix_str(f'loss {loss.item():.3f} lr {optimizer.param_groups[0]["lr"]:.4g}', refresh=False)
        if args.iters is not None and state['updates'] >= args.iters:
            break
    bar.close()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    totals = torch.stack([loss_sum, hits, torch.tensor(float(seen), dtype=torch.float64, device=device)])
    if ctx['distributed']:
        torch.distributed.all_reduce(totals)
    loss_sum, hits, seen = totals.tolist()
    metrics = {'loss': loss_sum / max(seen, 1), 'time': elapsed, 'lr': last_lr}
    if ctx['mixup_fn'] is None:
        metrics['top1'] = 100.0 * hits / max(seen, 1)
    return metrics


def _read_initial_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The weights of `--initial-checkpoint`, read safely (weights_only) and checked to be finite."""
    from .convert import check_finite, read_state_dict
    state_dict, _ = read_state_dict(path)
    check_finite(state_dict, f'--initial-checkpoint {path}')
    return state_dict


def _create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
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
        initial = _read_initial_checkpoint(args.initial_checkpoint)
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
        from .convert import check_state_dict
        check_state_dict(initial, model.state_dict(), what=f'--model {name} (--initial-checkpoint)')
        model.load_state_dict(initial, strict=True)
    return model


def _data_config(args: argparse.Namespace, model: nn.Module, train_ds) -> Dict[str, Any]:
    from timm.data import resolve_data_config
    overrides = dict(input_size=args.input_size, img_size=args.img_size, mean=args.mean, std=args.std,
                     crop_pct=args.crop_pct, interpolation=args.interpolation)
    in_chans = getattr(model, 'in_chans', None) or (getattr(model, 'pretrained_cfg', None) or {}).get(
        'input_size', (3,))[0]
    if args.input_size is not None and args.input_size[0] != in_chans:
        raise UserError(f'--input-size has {args.input_size[0]} channel(s) but {args.model} takes {in_chans} '
                        f'(build it with --model-kwargs in_chans={args.input_size[0]})')
    for flag, value in (('--mean', args.mean), ('--std', args.std)):
        if value is not None and len(value) not in (1, in_chans):
            raise UserError(f'{flag} takes 1 or {in_chans} values (one per input channel), got {len(value)}')
    base = train_ds.dataset if isinstance(train_ds, torch.utils.data.Subset) else train_ds
    if args.mean is None and args.std is None and hasattr(base, 'mean_std'):
        # In-memory data normalised with its own train statistics (the model cfgs carry CIFAR's).
        overrides['mean'], overrides['std'] = base.mean_std()
    cfg = resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}


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


def _write_json(path: Path, obj: Any) -> None:
    with atomic_file(path, 'w') as f:
        json.dump(obj, f, indent=1)


def train(args: argparse.Namespace) -> TrainResult:
    """Run a training as configured by `args` (from `add_arguments`; recipes resolved here)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.models import resume_checkpoint
    from timm.utils import (
        ModelEmaV3, NativeScaler, distribute_bn, init_distributed_device, random_seed, trim_summary, update_summary)

    args = resolve_args(args)

    # ---- device and distributed --------------------------------------------------------------------------------
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev_type = args.device.split(':')[0]
    if dev_type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available on this machine')
    try:
        device = init_distributed_device(args)  # sets args.distributed / rank / world_size (torchrun env)
    except (RuntimeError, ValueError) as e:
        raise UserError(f'cannot set up device {args.device}: {e}') from None
    distributed, rank, world_size = args.distributed, args.rank, args.world_size
    is_primary = rank == 0
    use_amp = args.amp if args.amp is not None else device.type == 'cuda'
    channels_last = args.channels_last if args.channels_last is not None else device.type == 'cuda'
    if args.sync_bn and distributed and device.type == 'cpu':
        raise UserError('--sync-bn needs GPUs: torch SyncBatchNorm does not run on CPU')
    random_seed(args.seed, rank)
    say = print if (is_primary and not args.quiet) else (lambda *a, **k: None)

    # ---- output folders (checked, not created yet) -------------------------------------------------------------
    resume_ckpt = read_checkpoint(args.resume) if args.resume else None
    if args.output is None:
        if args.resume:
            args.output = str(Path(args.resume).parent)
        else:
            stamp = time.strftime('%Y%m%d-%H%M%S')
            args.output = str(Path('output') / 'train' / f'{stamp}-{args.model.replace("/", "_")}')
    out_dir = Path(args.output)
    check_writable(out_dir, 'output folder')  # before any training, without creating it
    resuming_here = bool(args.resume) and Path(args.resume).resolve().parent == out_dir.resolve()
    if _is_run_dir(out_dir) and not resuming_here and not args.overwrite:
        raise UserError(f'output folder {out_dir} already holds a training run; choose another --output, '
                        f'--resume from its checkpoint, or pass --overwrite')
    if args.export:
        from .hub import check_export_dir
        check_export_dir(args.export, args.overwrite, what='export folder')  # now, not after the training

    # ---- data and model ----------------------------------------------------------------------------------------
    train_ds, val_ds = create_datasets(args, distributed, is_primary)
    label_names = label_names_of(train_ds)
    num_classes = args.num_classes or len(label_names)
    if not num_classes:
        raise UserError('cannot tell the number of classes of this dataset; pass --num-classes')
    if label_names and num_classes < len(label_names):
        raise UserError(f'--num-classes {num_classes} is smaller than the {len(label_names)} dataset classes')
    model = _create_model(args, num_classes)
    in_chans = getattr(model, 'in_chans', 3)
    if in_chans != 3 and not (args.dataset or '').lower().startswith('torch/'):
        raise UserError(f'{args.model} takes {in_chans} input channel(s), but this dataset\'s images are loaded as RGB '
                        f'(3 channels); drop in_chans from --model-kwargs')
    if resume_ckpt is not None:
        check_checkpoint_matches(resume_ckpt, model, args.model, args.resume)
        from .convert import check_finite
        check_finite(resume_ckpt['state_dict'], f'--resume checkpoint {args.resume}')
    data_config = _data_config(args, model, train_ds)
    train_tf, eval_tf = create_transforms(args, data_config)
    set_transform(train_ds, train_tf)
    set_transform(val_ds, eval_tf)
    train_loader, val_loader = create_loaders(args, train_ds, val_ds, device, distributed, rank, world_size)
    updates_per_epoch = len(train_loader)
    if args.iters is not None:
        args.epochs = math.ceil(args.iters / updates_per_epoch)
    num_params = sum(p.numel() for p in model.parameters())

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.sync_bn and is_primary:
        print('note: --sync-bn has no effect in a single process')

    try:
        optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                        momentum=args.momentum, filter_bias_and_bn=not args.decay_all)
    except (ValueError, AssertionError) as e:  # timm: unknown optimizer name
        raise UserError(f'--opt {args.opt}: {str(e) or type(e).__name__} (names: timm.optim.list_optimizers(); '
                        f'"momentum" = SGD with classical momentum)') from None
    loss_scaler = None
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    if use_amp:
        if amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)

        def autocast():
            return torch.autocast(device_type=device.type, dtype=amp_dtype)
    else:
        autocast = contextlib.nullcontext

    start_epoch, updates = 0, 0
    if resume_ckpt is not None:
        resumed = resume_checkpoint(model, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                                    loss_scaler=loss_scaler, log_info=False)
        start_epoch = resumed or 0
        updates = start_epoch * updates_per_epoch
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay)
        if resume_ckpt is not None and 'state_dict_ema' in resume_ckpt:
            from timm.models import clean_state_dict
            model_ema.module.load_state_dict(clean_state_dict(resume_ckpt['state_dict_ema']))
    del resume_ckpt

    unwrapped = model
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)

    # ---- schedule, loss ----------------------------------------------------------------------------------------
    lr_scheduler = create_lr_scheduler(optimizer, args, updates_per_epoch)
    if lr_scheduler is not None and start_epoch > 0:
        lr_scheduler.step(start_epoch)
        lr_scheduler.step_update(num_updates=updates)
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                         num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    criterion = criterion.to(device)

    # ---- outputs -----------------------------------------------------------------------------------------------
    saver = None
    history: List[Dict[str, Any]] = []
    log_path, csv_path = out_dir / 'log.json', out_dir / 'summary.csv'
    if is_primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not resuming_here:
            for p in [log_path, csv_path, *out_dir.glob('*' + CHECKPOINT_EXT)]:
                p.unlink(missing_ok=True)
        saver = _safe_saver_cls()(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=str(out_dir), recovery_dir=str(out_dir), decreasing=False,
            max_history=max(1, args.checkpoint_hist))
        if resuming_here:
            saver.load_state_dict_from_checkpoint(args.resume)
            if log_path.exists():
                with contextlib.suppress(ValueError, KeyError):
                    history = [h for h in json.loads(log_path.read_text())['epochs'] if h['epoch'] < start_epoch]
            trim_summary(str(csv_path), start_epoch)
        else:
            trim_summary(str(csv_path), 0)
    log_head = dict(model=args.model, recipe=args.recipe, dataset=args.dataset or 'ImageFolder', world_size=world_size,
                    num_params=num_params, num_classes=num_classes, label_names=label_names,
                    data_config=_plain(data_config), updates_per_epoch=updates_per_epoch, args=plain_args(args))

    say(f'train {args.model}: {num_params / 1e6:.3f}M params, {len(train_ds)} train / {len(val_ds)} val images, '
        f'{num_classes} classes, {args.epochs} epochs x {updates_per_epoch} steps'
        f'{f" x {world_size} ranks" if distributed else ""}, recipe {args.recipe or "(none)"}, device {device}'
        f'{", amp " + args.amp_dtype if use_amp else ""} -> {getattr(args, "display_output", None) or out_dir}')

    ctx = dict(args=args, device=device, channels_last=channels_last, autocast=autocast, loss_scaler=loss_scaler,
               model_ema=model_ema, unwrapped=unwrapped, mixup_fn=mixup_fn, distributed=distributed,
               show_bar=is_primary and args.progress, num_epochs=args.epochs)
    state = {'updates': updates}
    best_metric, best_epoch = (saver.best_metric, saver.best_epoch) if saver is not None else (None, None)
    metric_name = 'top1'
    for epoch in range(start_epoch, args.epochs):
        if args.iters is not None and state['updates'] >= args.iters:
            break
        train_metrics = _train_one_epoch(epoch, model, train_loader, optimizer, criterion, lr_scheduler, state, ctx)
        lr = train_metrics.pop('lr')  # the lr of the epoch's last step (per-update schedules change it inside)
        if distributed:
            distribute_bn(model, world_size, reduce=True)  # identical BN statistics on every rank
        t0 = time.perf_counter()
        eval_metrics = evaluate(model, val_loader, device, autocast, channels_last, distributed)
        ema_metrics = None
        if model_ema is not None:
            if distributed:
                distribute_bn(model_ema, world_size, reduce=True)
            ema_metrics = evaluate(model_ema, val_loader, device, autocast, channels_last, distributed)
        eval_time = time.perf_counter() - t0
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics[metric_name])
        ranked = ema_metrics if ema_metrics is not None else eval_metrics
        row = dict(epoch=epoch, lr=lr, train_loss=train_metrics['loss'], train_top1=train_metrics.get('top1'),
                   train_time=train_metrics['time'], eval_loss=eval_metrics['loss'], eval_top1=eval_metrics['top1'],
                   eval_top5=eval_metrics['top5'], eval_correct=eval_metrics['correct'],
                   eval_count=eval_metrics['count'], eval_time=eval_time, updates=state['updates'])
        if ema_metrics is not None:
            row.update(ema_loss=ema_metrics['loss'], ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
        history.append(row)
        if is_primary:
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=ranked[metric_name])
            update_summary(epoch, {k: v for k, v in train_metrics.items() if k != 'time'},
                           {k: v for k, v in eval_metrics.items() if k in ('loss', 'top1', 'top5')},
                           str(csv_path), lr=lr)
            _write_json(log_path, dict(log_head, epochs=history, best=dict(epoch=best_epoch, top1=best_metric),
                                       finished=False))
        say(f'epoch {epoch + 1:>3}/{args.epochs}  lr {lr:.4g}  train loss {train_metrics["loss"]:.4f}'
            + (f' acc {train_metrics["top1"]:.2f}%' if 'top1' in train_metrics else '')
            + f'  val loss {eval_metrics["loss"]:.4f} top1 {eval_metrics["top1"]:.2f}% top5 {eval_metrics["top5"]:.2f}%'
            + (f'  ema top1 {ema_metrics["top1"]:.2f}%' if ema_metrics else '')
            + f'  ({train_metrics["time"]:.1f}s train, {eval_time:.1f}s val)', flush=True)

    checksums = None
    if distributed:
        checksums = [None] * world_size
        torch.distributed.all_gather_object(checksums, state_checksum(unwrapped))
        if len(set(checksums)) != 1:
            raise RuntimeError(f'replicas diverged after training (state checksums {checksums})')
    best_file = out_dir / ('model_best' + CHECKPOINT_EXT)
    result = TrainResult(
        model_name=args.model, output_dir=out_dir, history=history, best_metric=best_metric, best_epoch=best_epoch,
        best_checkpoint=best_file if best_file.exists() else None, num_params=num_params, num_classes=num_classes,
        label_names=label_names, data_config=data_config, metric_name=metric_name, world_size=world_size,
        model=unwrapped)
    if is_primary:
        if args.export and result.best_checkpoint is not None:
            best_row = next((h for h in history if h['epoch'] == best_epoch), {})
            prefix = 'ema_' if model_ema is not None else 'eval_'
            metrics = {k: round(best_row[prefix + k], 3) for k in ('top1', 'top5')
                       if best_row.get(prefix + k) is not None}
            result.export_dir = export_checkpoint(
                result.best_checkpoint, args.export, args=args, data_config=data_config, label_names=label_names,
                metrics=metrics, use_ema=model_ema is not None, world_size=world_size)
            say(f'exported the best checkpoint (epoch {best_epoch + 1}, top1 {best_metric:.2f}%) '
                f'to {result.export_dir}')
        _write_json(log_path, dict(log_head, epochs=history, best=dict(epoch=best_epoch, top1=best_metric),
                                   finished=True, replica_checksums=checksums,
                                   export_dir=str(result.export_dir) if result.export_dir else None))
    if distributed:
        torch.distributed.barrier()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Export of the best checkpoint
# ---------------------------------------------------------------------------------------------------------------

def apply_data_config(model: nn.Module, data_config: Dict[str, Any]) -> None:
    """Record the data processing the model was trained with in its `pretrained_cfg` (exported with it)."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    for key in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode'):
        if key in data_config:
            value = data_config[key]
            cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg['num_classes'] = getattr(model, 'num_classes', cfg.get('num_classes'))
    model.pretrained_cfg = cfg


def recipe_markdown(args: argparse.Namespace, world_size: int = 1) -> str:
    """The resolved training settings as a markdown list (for the exported model card)."""
    sched = f'{args.sched}'
    if args.decay_iters:
        sched = f'multistep, x{args.decay_rate:g} at iterations {", ".join(map(str, args.decay_iters))}'
    elif args.sched == 'multistep':
        sched += f', x{args.decay_rate:g} at epochs {", ".join(map(str, args.decay_milestones))}'
    elif args.sched == 'step':
        sched += f', x{args.decay_rate:g} every {args.decay_epochs:g} epochs'
    if args.warmup_epochs:
        sched += f'; {args.warmup_epochs}-epoch linear warm-up from {args.warmup_lr:g}'
    aug = {'cifar': f'zero-pad {args.pad} px + random crop, horizontal flip p={args.hflip:g}',
           'timm': f'timm RandomResizedCrop scale {tuple(args.scale)}, flip p={args.hflip:g}, '
                   f'colour jitter {args.color_jitter:g}' + (f', auto-augment {args.aa}' if args.aa else ''),
           'none': 'none'}[args.train_aug]
    length = f'{args.iters} iterations' if args.iters else f'{args.epochs} epochs'
    lines = [
        'Trained with `timm-layerattn train`' + (f' (recipe `{args.recipe}`)' if args.recipe else '') + ':',
        '',
        f'- data: `{args.dataset or "ImageFolder"}`' + (f', {args.train_samples} training images' if args.train_samples
                                                         else ''),
        f'- optimizer: timm `{args.opt}`, lr {args.lr:g}, momentum {args.momentum:g}, weight decay '
        f'{args.weight_decay:g} ({"all parameters" if args.decay_all else "not on norms and biases"})',
        f'- batch {args.batch_size}' + (f' x {world_size} ranks' if world_size > 1 else '') + f', {length}',
        f'- schedule: {sched}',
        f'- augmentation: {aug}; label smoothing {args.smoothing:g}'
        + (f', mixup {args.mixup:g}' if args.mixup else '') + (f', cutmix {args.cutmix:g}' if args.cutmix else ''),
        f'- seed {args.seed}' + (', weights: EMA' if args.model_ema else ''),
    ]
    return '\n'.join(lines)


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
    from .hub import export_folder
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


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """CLI entry (`timm-layerattn train`)."""
    result = train(args)
    if result.best_metric is not None and (not args.quiet) and int(os.environ.get('RANK', 0)) == 0:
        which = 'EMA top1' if args.model_ema else 'top1'
        print(f'best {which} {result.best_metric:.2f}% at epoch {result.best_epoch + 1}; '
              f'checkpoint {result.best_checkpoint}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m timm_layerattn.train` (what torchrun launches on every rank)."""
    from .cli import run_reporting_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    args = parse_args([a for a in argv if a != '--debug'])
    try:
        return run_reporting_errors('timm-layerattn train', lambda: run(args), debug=debug)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
