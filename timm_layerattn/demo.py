"""`timm-layerattn demo`: the whole product on one CPU in a few minutes, no downloads.

1. prints the model table (params, GMACs) of the models it trains;
2. trains each of them with `timm-layerattn train` (recipe `digits`) on scikit-learn's bundled handwritten digits
   (8x8 upscaled to 32x32, fixed train/val split), with a progress bar;
3. prints a results table (val accuracy, params, seconds per epoch);
4. exports the best model to a Hub-ready folder (`model.safetensors`, `config.json`, model card);
5. reloads that folder with `timm.create_model('local-dir:<folder>', pretrained=True)`, evaluates it again with
   the data config it carries, and checks the accuracy equals the one measured in training;
6. saves the training curves as a PNG.

`--dataset torch/cifar100 DATA_DIR --dataset-download` or an ImageFolder path runs the same on other data.
"""
import argparse
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from ._utils.args import float_arg, int_arg
from ._utils.errors import UserError
from ._utils.files import MARKER_KEY, check_output_dir, output_marker, read_marker

__all__ = ['DEFAULT_MODELS', 'EXTRA_FAMILY_MODELS', 'default_models', 'is_demo_folder', 'add_arguments', 'run',
           'plot_curves']

# Always trained: the layer-attention papers' CIFAR baseline and KCLA on it.
DEFAULT_MODELS = ('cifar_resnet20', 'cifar_resnet20_kcla')
# One small CIFAR model per further family, trained by default once that family is registered (MRLA is left to
# `--models ... cifar_resnet20_mrlal cifar_resnet20_mrlab` to keep `make demo` well inside 10 minutes on 2 cores).
EXTRA_FAMILY_MODELS = ('cifar_resnet20_basic_cbam',)

# The demo's summary; its marker entry (`_utils.files.output_marker`) says the folder is a demo output, which a
# later demo replaces. Any other folder is never replaced.
DEMO_MARKER = 'demo.json'
DEMO_KIND = 'a demo output folder (one with the demo.json of an earlier demo)'


def is_demo_folder(folder: Path) -> bool:
    """Whether `folder` holds an earlier demo's output (marker in demo.json; older demos: its summary keys)."""
    marker = read_marker(folder / DEMO_MARKER)
    if marker is not None:
        return marker.get('kind') == 'demo'
    try:
        summary = json.loads((folder / DEMO_MARKER).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {'models', 'results', 'reload'} <= summary.keys()


def default_models() -> List[str]:
    import timm
    return list(DEFAULT_MODELS) + [m for m in EXTRA_FAMILY_MODELS if timm.is_model(m)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data_dir', nargs='?', default=None, metavar='DATA_DIR',
                        help='dataset folder for --dataset other than digits (ImageFolder or torch/ download folder)')
    parser.add_argument('--dataset', default='digits',
                        help='digits (embedded, default), an ImageFolder ("" with DATA_DIR), torch/cifar10, '
                             'torch/cifar100, ...')
    parser.add_argument('--dataset-download', action='store_true', help='download torch/ datasets if missing')
    parser.add_argument('--models', nargs='+', default=None, metavar='NAME',
                        help=f'models to train (default: {", ".join(DEFAULT_MODELS)}, plus '
                             f'{", ".join(EXTRA_FAMILY_MODELS)} when registered)')
    parser.add_argument('--epochs', type=int_arg(min=1), default=None,
                        help='epochs per model (default: the digits recipe\'s)')
    parser.add_argument('--batch-size', '-b', type=int_arg(min=1), default=None,
                        help='batch size (default: the recipe\'s)')
    parser.add_argument('--lr', type=float_arg(min=0, min_open=True), default=None,
                        help='learning rate, used as given (default: the recipe\'s, scaled to --batch-size)')
    parser.add_argument('--train-samples', type=int_arg(min=1), default=None, metavar='N',
                        help='train on N images only')
    parser.add_argument('--val-samples', type=int_arg(min=1), default=None, metavar='N',
                        help='validate on N images only')
    parser.add_argument('--seed', type=int_arg(0, 2 ** 31 - 1), default=42)
    parser.add_argument('--output', '-o', default='demo_output', metavar='DIR',
                        help='results folder (default: ./demo_output; a previous demo there is replaced, any '
                             'other non-empty folder is refused)')
    # An earlier demo's folder is always replaced and any other folder never is; the flag is kept so that
    # existing command lines still parse.
    parser.add_argument('--overwrite', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--export-model', default=None, metavar='NAME',
                        help='model to export and reload (default: the one with the best val accuracy)')
    parser.add_argument('--bench', action=argparse.BooleanOptionalAction, default=True,
                        help='also run the ResNet-50 speed comparison (timm_layerattn.tools.bench) when available')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True, help='progress bars')


def _train_argv(args: argparse.Namespace, model: str, run_dir: Path) -> List[str]:
    argv = ['--recipe', 'digits', '--model', model, '--seed', str(args.seed), '--output', str(run_dir),
            '--dataset', args.dataset or '']
    if args.data_dir:
        argv.append(args.data_dir)
    if args.dataset_download:
        argv.append('--dataset-download')
    if (args.dataset or '').lower() not in ('digits', 'sklearn/digits'):
        argv += ['--hflip', '0.5']  # natural images: the usual flips (digits are not mirror-symmetric)
    for flag, value in (('--epochs', args.epochs), ('--batch-size', args.batch_size), ('--lr', args.lr),
                        ('--train-samples', args.train_samples), ('--val-samples', args.val_samples)):
        if value is not None:
            argv += [flag, str(value)]
    if not args.progress:
        argv.append('--no-progress')
    # fp32, default memory format on every device: the reloaded model is re-evaluated the same way and must
    # reproduce the accuracy exactly.
    argv += ['--no-amp', '--no-channels-last']
    return argv


def _results_table(results: Sequence[Any]) -> str:
    header = (f'{"model":<30} {"params (M)":>10} {"best val acc":>12} {"final val acc":>13} {"best epoch":>10} '
              f'{"s/epoch":>8}')
    lines = [header, '-' * len(header)]
    for r in results:
        lines.append(f'{r.model_name:<30} {r.num_params / 1e6:>10.3f} {r.best_metric:>11.2f}% '
                     f'{r.history[-1]["eval_top1"]:>12.2f}% {r.best_epoch:>10} {r.train_time_per_epoch:>8.1f}')
    return '\n'.join(lines)


def plot_curves(results: Sequence[Any], path: Path) -> Path:
    """Training loss and validation accuracy per epoch of every run, one PNG (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        epochs = [h['epoch'] + 1 for h in r.history]
        line, = ax_loss.plot(epochs, [h['train_loss'] for h in r.history], marker='o', ms=3,
                             label=f'{r.model_name} train')
        ax_loss.plot(epochs, [h['eval_loss'] for h in r.history], ls='--', marker='x', ms=3, color=line.get_color(),
                     label=f'{r.model_name} val')
        ax_acc.plot(epochs, [h['eval_top1'] for h in r.history], marker='o', ms=3, color=line.get_color(),
                    label=r.model_name)
    ax_loss.set(xlabel='epoch', ylabel='cross-entropy', title='loss', yscale='log')
    ax_acc.set(xlabel='epoch', ylabel='top-1 accuracy (%)', title='validation accuracy')
    ax_acc.set_ylim(top=100)
    from matplotlib.ticker import MaxNLocator
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reload_and_evaluate(export_dir: Path, val_dataset, batch_size: int, device: str = 'cpu') -> Dict[str, float]:
    """Load an exported folder the way users will (`local-dir:` + pretrained) and evaluate it on `val_dataset`.

    The evaluation transform comes from the reloaded model's own data config, so this also checks that the
    export recorded the normalisation and input size used in training.
    """
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from .train import evaluate, set_transform
    model = timm.create_model(f'local-dir:{export_dir}', pretrained=True).eval().to(device)
    set_transform(val_dataset, create_transform(**resolve_data_config({}, model=model), is_training=False))
    loader = torch.utils.data.DataLoader(val_dataset, batch_size=batch_size, shuffle=False)
    return evaluate(model, loader, torch.device(device))


def _run_bench() -> None:
    if importlib.util.find_spec('timm_layerattn.tools.bench') is None:
        return
    bench = importlib.import_module('timm_layerattn.tools.bench')
    if hasattr(bench, 'main_for_demo'):
        print('\n== speed of the ResNet-50 variants (timm_layerattn.tools.bench) ==', flush=True)
        bench.main_for_demo()


def run(args: argparse.Namespace) -> int:
    from .data import is_embedded_dataset, require_demo_extra
    require_demo_extra(*(['sklearn'] if is_embedded_dataset(args.dataset) else []), 'matplotlib')
    import timm
    from ._utils.files import atomic_dir
    from .tools.zoo import format_table, model_table
    from .train import export_checkpoint, parse_args, resolve_args, train

    t_start = time.perf_counter()
    models = args.models or default_models()
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        raise UserError(f'unknown model(s): {", ".join(unknown)}; see `timm-layerattn list`')
    if args.export_model and args.export_model not in models:
        raise UserError(f'--export-model {args.export_model} is not among the trained --models')
    if not is_embedded_dataset(args.dataset):
        is_torch = (args.dataset or '').lower().startswith('torch/')
        if not args.data_dir:
            raise UserError(f'--dataset {args.dataset or "(ImageFolder)"} needs DATA_DIR')
        if not Path(args.data_dir).exists() and not (is_torch and args.dataset_download):
            raise UserError(f'dataset folder not found: {args.data_dir}' +
                            (' (add --dataset-download to fetch it)' if is_torch else ''))
    out = Path(args.output)
    check_output_dir(out, overwrite=True, is_ours=is_demo_folder, kind=DEMO_KIND)  # before any training
    # Validate every run's arguments (recipe, data paths) before the first one starts.
    train_args = {m: parse_args(_train_argv(args, m, out / 'runs' / m)) for m in models}
    for a in train_args.values():
        resolve_args(a)

    print(f'timm-layerattn demo: {len(models)} models on {args.dataset or "ImageFolder"} '
          f'(recipe digits{", overrides given" if any([args.epochs, args.batch_size, args.lr]) else ""})\n')
    print(format_table(model_table(models, num_classes=10 if is_embedded_dataset(args.dataset) else None)), '\n',
          flush=True)

    with atomic_dir(out, overwrite=True, is_ours=is_demo_folder, kind=DEMO_KIND) as tmp:
        results = []
        for i, m in enumerate(models):
            print(f'== [{i + 1}/{len(models)}] {m} ==', flush=True)
            a = train_args[m]
            a.output = str(tmp / 'runs' / m)
            a.display_output = str(out / 'runs' / m)  # where the run will be once the demo folder is complete
            results.append(train(a))
            print(flush=True)

        print(f'== results ({results[0].history[-1]["eval_count"]} validation images) ==')
        print(_results_table(results), '\n', flush=True)

        chosen = (next(r for r in results if r.model_name == args.export_model) if args.export_model
                  else max(results, key=lambda r: r.best_metric))
        best = next(h for h in chosen.history if h['epoch'] == chosen.best_epoch)
        chosen_args = resolve_args(train_args[chosen.model_name])
        export_dir = tmp / 'export' / chosen.model_name
        export_checkpoint(chosen.best_checkpoint, str(export_dir), args=chosen_args, data_config=chosen.data_config,
                          label_names=chosen.label_names,
                          metrics={'top1': round(best['eval_top1'], 3), 'top5': round(best['eval_top5'], 3)})
        print(f'exported {chosen.model_name} (best epoch {chosen.best_epoch}, counted from 0) to '
              f'{out / "export" / chosen.model_name}'
              f'  [{", ".join(sorted(p.name for p in export_dir.iterdir()))}]')

        from .train import create_datasets
        _, val_ds = create_datasets(chosen_args)
        device = next(chosen.model.parameters()).device  # where training evaluated
        reloaded = reload_and_evaluate(export_dir, val_ds, chosen_args.validation_batch_size or chosen_args.batch_size,
                                       str(device))
        same = (reloaded['correct'], reloaded['count']) == (best['eval_correct'], best['eval_count'])
        print(f"reloaded with timm.create_model('local-dir:{out / 'export' / chosen.model_name}', pretrained=True)")
        print(f'  val accuracy in training: {chosen.best_metric:.2f}%   after reload: {reloaded["top1"]:.2f}%   '
              f'({reloaded["correct"]}/{reloaded["count"]} images) -> {"identical" if same else "MISMATCH"}')

        png = plot_curves(results, tmp / 'training_curves.png')
        summary = dict(
            **{MARKER_KEY: output_marker('demo')},
            dataset=args.dataset, models=models, seed=args.seed, exported=chosen.model_name,
            reload=dict(trained_top1=chosen.best_metric, reloaded_top1=reloaded['top1'], identical=same),
            results=[dict(model=r.model_name, params=r.num_params, best_top1=r.best_metric, best_epoch=r.best_epoch,
                          final_top1=r.history[-1]['eval_top1'], train_s_per_epoch=r.train_time_per_epoch,
                          history=r.history) for r in results])
        (tmp / DEMO_MARKER).write_text(json.dumps(summary, indent=1))
    print(f'training curves: {out / png.name}')
    print(f'runs (checkpoints, summary.csv, log.json): {out / "runs"}')

    if args.bench:
        _run_bench()
    print(f'\ndemo finished in {time.perf_counter() - t_start:.0f} s')
    if not same:
        print('error: the reloaded model does not reproduce the trained accuracy', file=sys.stderr)
        return 1
    return 0
