"""Data of `timm-layerattn train`: timm datasets (or the embedded digits), transforms, loaders, data config.

Datasets are opened before the model exists; their transforms are attached once the model's data config
(input size, normalisation) is resolved, so the evaluation transform is the one an exported model carries.
"""
import argparse
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._utils.errors import UserError

__all__ = ['label_names_of', 'set_transform', 'create_datasets', 'create_transforms', 'create_loaders',
           'create_data_config']


def _subset(dataset, n: Optional[int], seed: int):
    """A fixed random subset of `n` items (sorted indices), for quick runs on part of the data."""
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
    """Attach `transform` to `dataset` (through a `Subset`): transforms are known only once the model is."""
    ds = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    ds.transform = transform


def create_datasets(args: argparse.Namespace, distributed: bool = False, is_primary: bool = True):
    """Train and validation datasets (transforms are attached later, once the model's data config is known)."""
    name = args.dataset or ''
    from ..data import DigitsDataset, is_embedded_dataset
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
    """Train and eval transforms for `data_config`; `--train-aug` picks the papers' CIFAR crop or timm's."""
    from timm.data import create_transform
    from ..data import cifar_train_transform
    eval_tf = create_transform(**data_config, is_training=False)
    img_size = data_config['input_size'][-1]
    if args.train_aug == 'cifar':
        train_tf = cifar_train_transform(img_size, data_config['mean'], data_config['std'], args.pad, args.hflip)
    elif args.train_aug == 'timm':
        try:
            train_tf = create_transform(
                **data_config, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob, re_mode='pixel')
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
    """Train loader (sharded and reshuffled per epoch when distributed) and an exactly partitioned val loader."""
    from torch.utils.data import DataLoader, DistributedSampler
    workers = args.workers
    if workers is None:
        from ..data import is_embedded_dataset
        workers = 0 if is_embedded_dataset(args.dataset) else min(4, os.cpu_count() or 1)
    common = dict(num_workers=workers, pin_memory=device.type == 'cuda', persistent_workers=workers > 0)
    if args.aug_repeats > 1:  # each image several times per epoch, its copies spread over the ranks (DeiT's RA)
        from timm.data.distributed_sampler import RepeatAugSampler
        train_sampler = RepeatAugSampler(
            train_ds, num_replicas=world_size, rank=rank, shuffle=True, num_repeats=args.aug_repeats)
        per_rank = len(train_sampler)
    elif distributed:
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


def create_data_config(args: argparse.Namespace, model: nn.Module, train_ds) -> Dict[str, Any]:
    """timm's data config of `model` with the command line's overrides (checked against its input channels)."""
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
