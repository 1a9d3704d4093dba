"""`timm-layerattn train`: train a model with the papers' recipes, built from timm's training parts.

Data (`timm.data.create_dataset` + timm transforms, plus the embedded digits set and the CIFAR pad-and-crop
augmentation of `timm_layerattn.data`), optimizer (`create_optimizer_v2`), schedule (`create_scheduler_v2`),
loss (`timm.loss`), EMA (`ModelEmaV3`), checkpoints (`CheckpointSaver`) and distributed set-up
(`init_distributed_device`, `distribute_bn`) all come from timm; this package wires them together with the
layer-attention papers' recipes (`--recipe`), a progress bar, a per-epoch CSV/JSON log and an export of
the best model to a Hub-ready folder.

Single process:   timm-layerattn train --recipe kcla-cifar --model cifar_resnet56_kcla \
                      --dataset torch/cifar10 --dataset-download data/cifar10
Distributed:      torchrun --nproc_per_node 8 -m timm_layerattn.train --recipe la-imagenet \
                      --model resnet50_kcla /data/imagenet --sync-bn

`--batch-size` is per rank and `--lr` absolute, as in timm's train.py; a recipe's lr is for the papers' total
batch (`--lr-base` @ `--lr-base-size`), which by default is split over the ranks (8 x 32 = 256 above) and
otherwise followed by the lr (linear rule, `--no-lr-scale` to keep it). Epochs count from 0, as in timm.

Checkpoints are plain dicts of tensors and Python scalars: they load with `torch.load(..., weights_only=True)`.

Modules: `recipes` (the `--recipe` table), `args` (parser, recipe resolution), `data` (datasets, transforms,
loaders), `checkpoint` (read, save, checksum, export), `setup` (device, folders, data, model, optimizer,
schedule, resume: the run's `TrainContext`), `loop` (epochs, evaluation, finish, entry points).
"""
from .args import add_arguments, parse_args, resolve_args
from .checkpoint import (
    CHECKPOINT_EXT, check_checkpoint_matches, export_checkpoint, read_checkpoint, state_checksum)
from .data import create_datasets, create_loaders, create_transforms, label_names_of, set_transform
from .loop import TrainingDiverged, TrainResult, evaluate, main, run, train
from .recipes import RECIPES, recipe_markdown
from .setup import TrainContext, create_lr_scheduler

__all__ = ['RECIPES', 'TrainResult', 'TrainingDiverged', 'TrainContext', 'add_arguments', 'resolve_args', 'train',
           'run', 'main', 'evaluate', 'export_checkpoint', 'parse_args', 'create_lr_scheduler', 'read_checkpoint',
           'check_checkpoint_matches', 'state_checksum', 'create_datasets', 'create_loaders', 'create_transforms',
           'label_names_of', 'set_transform', 'recipe_markdown', 'CHECKPOINT_EXT']
