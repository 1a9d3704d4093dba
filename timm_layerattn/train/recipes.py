"""Training recipes (`--recipe`): the papers' settings as argument defaults, and their markdown for model cards.

Keys are argument names (`dest`); every value can be overridden on the command line. A recipe states its
learning rate as the papers do, for their total batch over all GPUs: `lr_base` at `lr_base_size` (timm's
`--lr-base` / `--lr-base-size`). That total is also the default global batch, split over the ranks
(`args.resolve_args`), so a recipe trains at the papers' batch and lr on any number of GPUs.
"""
import argparse
from typing import Any, Dict

__all__ = ['BASE_DEFAULTS', 'RECIPES', 'RECIPE_HELP', 'recipe_markdown']

# Defaults without --recipe: plain SGD-momentum with a cosine schedule and timm's standard augmentation.
BASE_DEFAULTS: Dict[str, Any] = dict(
    dataset='', opt='momentum', lr_base=0.1, lr_base_size=128, momentum=0.9, weight_decay=1e-4, decay_all=False,
    epochs=100, iters=None, sched='cosine', sched_on_updates=False,
    decay_milestones=[30, 60, 90], decay_epochs=30.0, decay_iters=None, decay_rate=0.1,
    warmup_epochs=0, warmup_lr=1e-4, min_lr=0.0, smoothing=0.0,
    train_aug='timm', hflip=0.5, pad=4, color_jitter=0.4, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3],
    aa=None, reprob=0.0, aug_repeats=0, mixup=0.0, cutmix=0.0, model_ema=False, model_ema_decay=0.9998,
    opt_eps=None, drop=None, drop_path=None,  # None: the optimizer's / model's own default
    lr_base_scale='',  # timm's rule
)

# The CIFAR recipe stated in the KCLA and MRLA papers' experiment sections: SGD with classical momentum
# (timm's 'momentum'; its 'sgd' is Nesterov), weight decay on every parameter, 10-epoch linear warm-up from 0.001.
_LA_CIFAR = dict(
    opt='momentum', lr_base=0.1, lr_base_size=128, momentum=0.9, weight_decay=1e-4, decay_all=True, epochs=180,
    sched='multistep', decay_milestones=[100, 150], decay_rate=0.1, warmup_epochs=10, warmup_lr=1e-3,
    smoothing=0.0, train_aug='cifar', hflip=0.5, pad=4,
)

# The ImageNet recipe of the official KCLA / MRLA train.py: lr 0.1 for a total batch of 256, 100 epochs,
# 3-epoch linear warm-up from 1e-4, RandomResizedCrop + flip only (no colour jitter), no label smoothing.
_LA_IMAGENET = dict(
    opt='momentum', lr_base=0.1, lr_base_size=256, momentum=0.9, weight_decay=1e-4, decay_all=True, epochs=100,
    sched='step', decay_epochs=30.0, decay_rate=0.1, warmup_epochs=3, warmup_lr=1e-4,
    smoothing=0.0, train_aug='timm', hflip=0.5, color_jitter=0.0, scale=[0.08, 1.0],
)

RECIPES: Dict[str, Dict[str, Any]] = {
    'kcla-cifar': dict(_LA_CIFAR),
    'mrla-cifar': dict(_LA_CIFAR),
    # Attention Shortcuts, as its paper trains on CIFAR: the 2016 ResNet CIFAR recipe, 64k iterations at batch 128
    # (164 epochs of 391 steps), lr / 10 at 32k and 48k iterations, no warm-up.
    'as-cifar': dict(
        opt='momentum', lr_base=0.1, lr_base_size=128, momentum=0.9, weight_decay=1e-4, decay_all=True,
        iters=64000, sched='multistep', decay_iters=[32000, 48000], decay_rate=0.1, warmup_epochs=0,
        smoothing=0.0, train_aug='cifar', hflip=0.5, pad=4,
    ),
    # MRLA's decay: x0.1 every 30 epochs.
    'la-imagenet': dict(_LA_IMAGENET),
    'mrla-imagenet': dict(_LA_IMAGENET),
    # KCLA's decay: x0.1 at 40, x0.01 at 70, x0.001 at 90.
    'kcla-imagenet': dict(_LA_IMAGENET, sched='multistep', decay_milestones=[40, 70, 90]),
    # DeiT + MRLA (joyfang1106/MRLA deit/main.py, the DeiT recipe): AdamW lr 5e-4 x batch / 512 (1e-3 at the
    # DeiT paper's batch of 1024), wd 0.05 off norms and biases, 300 epochs, 5-epoch warm-up from 1e-6, cosine
    # to 1e-5, RandAugment m9 / mstd 0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0 with label smoothing 0.1,
    # three repeated augmentations, drop path 0.1, an EMA of the weights (decay 0.99996).
    'deit-mrla': dict(
        opt='adamw', lr_base=1e-3, lr_base_size=1024, lr_base_scale='linear', opt_eps=1e-8, weight_decay=0.05, decay_all=False, epochs=300,
        sched='cosine', warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5, smoothing=0.1, train_aug='timm', hflip=0.5,
        color_jitter=0.4, aa='rand-m9-mstd0.5-inc1', reprob=0.25, aug_repeats=3, mixup=0.8, cutmix=1.0,
        drop_path=0.1, model_ema=True, model_ema_decay=0.99996,
    ),
    # EfficientNet + MRLA (the MRLA README's command for timm 0.4.9's train.py, 2 GPUs x 384): RMSprop (TF style,
    # eps 1e-3) lr 0.048 at batch 768, wd 1e-5, 350 epochs, x0.97 every 2.4 epochs after a 3-epoch warm-up from
    # 1e-6 (train.py's default length), RandAugment m9 / mstd 0.5, random erasing 0.2, label smoothing 0.1
    # (train.py's default), dropout 0.2, drop path 0.2.
    'effnet-mrla': dict(
        opt='rmsproptf', lr_base=0.048, lr_base_size=768, opt_eps=1e-3, momentum=0.9, weight_decay=1e-5,
        decay_all=False, epochs=350, sched='step', decay_epochs=2.4, decay_rate=0.97, warmup_epochs=3,
        warmup_lr=1e-6, smoothing=0.1, train_aug='timm', hflip=0.5, color_jitter=0.4, aa='rand-m9-mstd0.5',
        reprob=0.2, drop=0.2, drop_path=0.2,
    ),
    # The demo's recipe for the embedded 8x8 digits (32x32 upscaled): short, no flips (digits are not
    # mirror-symmetric), the CIFAR pad-and-crop as the only augmentation.
    'digits': dict(
        dataset='digits', opt='adamw', lr_base=2e-3, lr_base_size=32, weight_decay=0.05, decay_all=False, epochs=5,
        sched='cosine', sched_on_updates=True, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5,
        smoothing=0.0, train_aug='cifar', hflip=0.0, pad=4,
    ),
}

# Batches are totals over all ranks (`-b` is per rank); "lr 0.1 @ 128" = lr 0.1 for a total batch of 128.
RECIPE_HELP = {
    'kcla-cifar': 'KCLA paper CIFAR: SGD lr 0.1 @ 128, m0.9, wd 1e-4, 180 ep, 10-ep warm-up from 1e-3, '
                  'x0.1 at 100/150',
    'mrla-cifar': 'MRLA paper CIFAR: same as kcla-cifar',
    'as-cifar': 'Attention Shortcuts CIFAR: SGD lr 0.1 @ 128, m0.9, wd 1e-4, 64k iters, x0.1 at 32k/48k iters',
    'la-imagenet': 'layer-attention ImageNet (MRLA decay): SGD lr 0.1 @ 256, 100 ep, 3-ep warm-up, x0.1 every 30 ep',
    'mrla-imagenet': 'same as la-imagenet',
    'kcla-imagenet': 'la-imagenet with KCLA decay: x0.1 at 40, 70, 90',
    'deit-mrla': 'DeiT recipe (MRLA deit/main.py): AdamW lr 5e-4 x batch/512 (1e-3 @ 1024), wd 0.05, 300 ep cosine, '
                 '5-ep warm-up, RandAugment, random erasing 0.25, mixup 0.8 / cutmix 1.0, smoothing 0.1, 3 repeated '
                 'augmentations, drop path 0.1, EMA',
    'effnet-mrla': 'EfficientNet recipe (MRLA README): RMSpropTF lr 0.048 @ 768, wd 1e-5, 350 ep, x0.97 every 2.4 ep, '
                   'RandAugment, random erasing 0.2, smoothing 0.1, dropout 0.2, drop path 0.2',
    'digits': 'the demo: embedded 8x8 digits at 32 px, AdamW lr 2e-3 @ 32, wd 0.05, 5 ep cosine, pad-4 crop, no flip',
}


def recipe_markdown(args: argparse.Namespace, world_size: int = 1) -> str:
    """The resolved training settings as a markdown list (for the exported model card); the batch is the global one
    and the lr the one used, with its origin when it is not the recipe's."""
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
    global_batch = getattr(args, 'global_batch_size', None) or args.batch_size * world_size
    origin = getattr(args, 'lr_origin', None)
    scaled = origin is not None and args.lr != getattr(args, 'lr_base', args.lr)
    lines = [
        'Trained with `timm-layerattn train`' + (f' (recipe `{args.recipe}`)' if args.recipe else '') + ':',
        '',
        f'- data: `{args.dataset or "ImageFolder"}`' + (f', {args.train_samples} training images' if args.train_samples
                                                         else ''),
        f'- optimizer: timm `{args.opt}`, lr {args.lr:g}' + (f' ({origin})' if scaled else '') +
        f', momentum {args.momentum:g}, weight decay {args.weight_decay:g} '
        f'({"all parameters" if args.decay_all else "not on norms and biases"})',
        f'- batch {global_batch}' + (f' ({world_size} ranks x {args.batch_size})' if world_size > 1 else '') +
        f', {length}',
        f'- schedule: {sched}',
        f'- augmentation: {aug}; label smoothing {args.smoothing:g}'
        + (f', mixup {args.mixup:g}' if args.mixup else '') + (f', cutmix {args.cutmix:g}' if args.cutmix else ''),
        f'- seed {args.seed}' + (', weights: EMA' if args.model_ema else ''),
    ]
    return '\n'.join(lines)
