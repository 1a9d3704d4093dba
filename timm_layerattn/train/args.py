"""Arguments of `timm-layerattn train`: the parser, and the resolution of unset values from `--recipe`.

Every flag that a recipe sets defaults to None here, so `resolve_args` can tell "not given" from "given":
given values win, then the recipe's, then `BASE_DEFAULTS`.

Batch and learning rate follow timm's train.py: `--batch-size` is per rank, `--lr` is used as given, and
without it the lr is `--lr-base` scaled from `--lr-base-size` to the global batch (`--lr-base-scale`). Recipes
give the papers' lr and total batch as `lr_base` / `lr_base_size`, and, unlike timm's fixed per-rank default,
the default per-rank batch is that total split over the ranks: the papers' batch and lr on any number of GPUs.
"""
import argparse
import copy
import math
from typing import Optional, Sequence

from .._utils.args import float_arg, int_arg
from .._utils.errors import UserError
from .recipes import BASE_DEFAULTS, RECIPE_HELP, RECIPES

__all__ = ['DESCRIPTION', 'INTERPOLATIONS', 'add_arguments', 'parse_args', 'resolve_args', 'batch_and_lr_line']

DESCRIPTION = "`timm-layerattn train`: train a model with the papers' recipes, built from timm's training parts."

# Argument types (`timm_layerattn._utils.args`): out-of-range values are refused at parse time, naming the flag.
POS_INT = int_arg(min=1)
POS_FLOAT = float_arg(min=0, min_open=True)
NONNEG_FLOAT = float_arg(min=0)
PROB = float_arg(0, 1)
PROB_OPEN = float_arg(0, 1, max_open=True)
SEED = int_arg(0, 2 ** 31 - 1)  # NumPy takes seeds below 2**32; rank offsets are added


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
    """Add the trainer's flags to `parser`; values a recipe sets default to None (see `resolve_args`)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        'recipes (--recipe; any flag overrides a recipe value; "lr 0.1 @ 128" = lr 0.1 for a global batch of 128):\n'
        + '\n'.join(f'  {k:<14} {v}' for k, v in RECIPE_HELP.items())
        + f'\n  {"(none)":<14} SGD-momentum lr 0.1 @ 128, wd 1e-4, 100 ep cosine, timm augmentation\n\n'
        'batch and lr (as in timm\'s train.py): -b is the batch per rank; without it the recipe\'s global batch\n'
        '(--lr-base-size) is split over the ranks. The lr is --lr-base scaled to the global batch (linear; sqrt for\n'
        'Ada*/LAMB optimizers) unless --no-lr-scale; --lr sets it as given. The run prints both.')
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
    g.add_argument('--drop', type=PROB_OPEN, default=None, metavar='P',
                   help='classifier dropout (default: the recipe\'s, else the model\'s)')
    g.add_argument('--drop-path', type=PROB_OPEN, default=None, metavar='P',
                   help='stochastic depth rate (default: the recipe\'s, else the model\'s)')
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
    g.add_argument('--lr', type=POS_FLOAT, default=None,
                   help='learning rate, used as given (not scaled with the batch); overrides --lr-base')
    g.add_argument('--lr-base', type=POS_FLOAT, default=None, metavar='LR',
                   help='learning rate for a global batch of --lr-base-size, scaled to the global batch run' + R)
    g.add_argument('--lr-base-size', type=POS_INT, default=None, metavar='N',
                   help='global batch (all ranks) that --lr-base is for; also the default global batch' + R)
    g.add_argument('--lr-base-scale', default=None, choices=('', 'linear', 'sqrt'), metavar='RULE',
                   help='how --lr-base follows the global batch: linear or sqrt (default: the recipe\'s, else '
                        'timm\'s rule, sqrt for Ada*/LAMB optimizers, else linear)')
    g.add_argument('--lr-scale', action=argparse.BooleanOptionalAction, default=True,
                   help='scale --lr-base to the global batch (default: on; --no-lr-scale uses --lr-base as it is)')
    g.add_argument('--momentum', type=PROB_OPEN, default=None, help='optimizer momentum' + R)
    g.add_argument('--opt-eps', type=POS_FLOAT, default=None, metavar='EPS',
                   help='optimizer epsilon (default: the recipe\'s, else the optimizer\'s)')
    g.add_argument('--weight-decay', '--wd', type=NONNEG_FLOAT, default=None, help='weight decay' + R)
    g.add_argument('--decay-all', action=argparse.BooleanOptionalAction, default=None,
                   help='weight decay on norms and biases too (the papers\' setting)' + R)
    g.add_argument('--clip-grad', type=POS_FLOAT, default=None, metavar='NORM', help='gradient clipping')
    g.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                   help='norm, value or agc (default: norm)')
    g.add_argument('--batch-size', '-b', type=POS_INT, default=None, metavar='N',
                   help='batch size per rank, as in timm (default: the recipe\'s global batch, --lr-base-size, '
                        'divided by the number of ranks)')
    g.add_argument('--validation-batch-size', '-vb', type=POS_INT, default=None, metavar='N',
                   help='validation batch size per rank (default: the training batch size)')
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
    g.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5' + R)
    g.add_argument('--reprob', type=PROB, default=None, help='random erasing probability (timm aug; per-pixel random values, as timm\'s train.py)' + R)
    g.add_argument('--aug-repeats', type=int_arg(min=0), default=None, metavar='N',
                   help='repeated augmentation: each image N times per epoch, as timm\'s RepeatAugSampler '
                        '(0 = off)' + R)
    g.add_argument('--smoothing', type=PROB_OPEN, default=None, help='label smoothing' + R)
    g.add_argument('--mixup', type=NONNEG_FLOAT, default=None, help='mixup alpha (0 = off)' + R)
    g.add_argument('--cutmix', type=NONNEG_FLOAT, default=None, help='cutmix alpha (0 = off)' + R)
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=None,
                   help='keep an EMA of the weights (ModelEmaV3); the EMA is validated, ranked and exported' + R)
    g.add_argument('--model-ema-decay', type=PROB_OPEN, default=None, help='EMA decay per step' + R)

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
    """The parser of `python -m timm_layerattn.train` (the CLI builds its own with `add_arguments`)."""
    parser = argparse.ArgumentParser(prog='timm-layerattn train', description=DESCRIPTION)
    add_arguments(parser)
    return parser.parse_args(argv)


def resolve_args(args: argparse.Namespace, world_size: int = 1) -> argparse.Namespace:
    """Fill unset (None) arguments from the recipe, then from the base defaults; set the per-rank batch and the
    lr for `world_size` ranks (`_resolve_batch_and_lr`); validate the combination."""
    args = copy.copy(args)
    if args.recipe is not None and args.recipe not in RECIPES:
        raise UserError(f'unknown recipe {args.recipe!r}; choose one of: {", ".join(RECIPES)}')
    if world_size < 1:
        raise UserError(f'world size must be >= 1, got {world_size}')
    recipe = RECIPES.get(args.recipe, {})
    base_given = getattr(args, 'lr_base', None) is not None or getattr(args, 'lr_base_size', None) is not None
    given = {key for key in BASE_DEFAULTS if getattr(args, key, None) is not None}  # on the command line
    for key, base in BASE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.copy(recipe.get(key, base)))
    if getattr(args, 'data_dir_opt', None):
        if args.data_dir and args.data_dir != args.data_dir_opt:
            raise UserError('give the dataset folder once: as DATA_DIR or as --data-dir')
        args.data_dir = args.data_dir_opt
    for name in ('epochs', 'lr_base_size'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be >= 1')
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError('--batch-size must be >= 1')
    if args.iters is not None and args.iters < 1:
        raise UserError('--iters must be >= 1')
    for name in ('lr', 'lr_base'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f'--{name.replace("_", "-")} must be > 0')
    _check_combinations(args, given)
    _resolve_batch_and_lr(args, world_size, 'recipe' if recipe and not base_given else 'base')
    return args


def _check_combinations(args: argparse.Namespace, given: set) -> None:
    """Refuse flags that the resolved arguments would ignore without a word (`given`: set on the command line)."""
    from ..data import is_embedded_dataset
    if args.data_dir and is_embedded_dataset(args.dataset or ''):
        raise UserError(f'--dataset {args.dataset} is embedded and reads no folder: drop DATA_DIR {args.data_dir} '
                        f'(or use --dataset "" for an image folder)')
    if 'pad' in given and args.train_aug != 'cifar':
        raise UserError(f'--pad is the padding of the cifar crop: it has no effect with --train-aug {args.train_aug} '
                        f'(use --train-aug cifar, or drop --pad)')
    if 'decay_milestones' in given and args.sched != 'multistep':
        raise UserError(f'--decay-milestones applies to --sched multistep only, not --sched {args.sched} '
                        f'(use --sched multistep, or drop --decay-milestones)')
    if 'decay_iters' in given and args.sched != 'multistep':
        raise UserError(f'--decay-iters applies to --sched multistep only, not --sched {args.sched} '
                        f'(use --sched multistep, or drop --decay-iters)')
    if args.iters is not None and 'epochs' in given:
        if 'iters' in given:
            raise UserError(f'give --iters or --epochs, not both: --iters {args.iters} decides the number of epochs '
                            f'(--epochs {args.epochs} would be ignored)')
        args.iters = None  # the recipe counts steps; --epochs, given, wins as every given flag does


def _resolve_batch_and_lr(args: argparse.Namespace, world_size: int, source: str) -> None:
    """timm's batch / lr rule with the recipe's total batch as the default global batch.

    Sets the per-rank `batch_size`, `global_batch_size`, the `lr` used, the rule (`lr_base_scale`) and
    `lr_origin`, which says how the lr came about (printed by the trainer, recorded in the card and logs).
    """
    base_lr, base_size = args.lr_base, args.lr_base_size
    uneven = ''
    if args.batch_size is None:
        args.batch_size = max(1, base_size // world_size)
        if args.batch_size * world_size != base_size:
            uneven = f'; {base_size} does not split evenly over {world_size} ranks'
    args.global_batch_size = args.batch_size * world_size
    if not args.lr_base_scale:
        args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
    quoted = f'{source} lr {base_lr:g} @ {base_size}'
    if args.lr is not None:
        origin = '--lr, not scaled'
    elif args.global_batch_size == base_size:
        args.lr, origin = base_lr, quoted
    elif not args.lr_scale:
        args.lr, origin = base_lr, f'{quoted}, not scaled: --no-lr-scale'
    else:
        ratio = args.global_batch_size / base_size
        args.lr = base_lr * (math.sqrt(ratio) if args.lr_base_scale == 'sqrt' else ratio)
        origin = f'{args.lr_base_scale} scaling of {quoted}; --no-lr-scale keeps {base_lr:g}'
    args.lr_origin = origin + uneven


def batch_and_lr_line(args: argparse.Namespace) -> str:
    """The one line that states the global batch and the lr actually used, e.g.
    'global batch 256 = 8 ranks x 32, lr 0.1 (recipe lr 0.1 @ 256)'."""
    ranks = args.global_batch_size // args.batch_size
    return (f'global batch {args.global_batch_size} = {ranks} rank{"s" if ranks > 1 else ""} x {args.batch_size}, '
            f'lr {args.lr:g} ({args.lr_origin})')
