"""`timm-layerattn reproduce TABLE`: rerun a paper's table (models x depths x seeds, the paper's recipe) and write
the measured mean +- SD beside the paper's values in results.md / results.csv.

Every run is an independent `timm-layerattn train` run in its own folder, so a reproduction resumes where it
stopped (finished runs are skipped, an interrupted one continues from its last checkpoint) and splits into jobs
for any scheduler (`--shard I/N`) or for SLURM through submitit (`--launcher submitit`). It trains on the embedded
digits data unless a dataset is named (`--dataset torch/cifar100 --data-dir DIR`, or only `--data-dir`: the
paper's datasets); `--quick` is a reduced grid of a few minutes on a CPU.

Modules: `tables` (the tables as data), `runs` (grid, shards, run state, one run as a job), `report`
(aggregation, results.md / results.csv), `launch` (in-process and submitit launchers).
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..._utils.args import int_arg
from ..._utils.errors import UserError
from .tables import TABLES, Table

__all__ = ['add_arguments', 'run', 'TABLES']

MARKER_FILE = 'reproduce.json'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .launch import add_slurm_arguments
    from .report import METRICS
    from .runs import parse_shard
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = 'tables:\n' + '\n'.join(
        f'  {t.name:<12} {t.title}; recipe {t.recipe}; rows: {", ".join(r.key for r in t.rows)}'
        for t in TABLES.values())
    parser.add_argument('table', choices=list(TABLES), metavar='TABLE', help='one of: ' + ', '.join(TABLES))
    g = parser.add_argument_group('grid')
    g.add_argument('--depths', type=int_arg(min=1), nargs='+', default=None, metavar='D',
                   help='depths to run (default: all of the table\'s)')
    g.add_argument('--rows', nargs='+', default=None, metavar='KEY', help='rows to run (default: all; keys below)')
    g.add_argument('--seeds', type=int_arg(min=1), default=None, metavar='N',
                   help='runs per cell, seeds FIRST, FIRST+1, ... (default: the paper\'s count, 5)')
    g.add_argument('--first-seed', type=int_arg(0, 2 ** 31 - 1000), default=42, metavar='FIRST',
                   help='first seed (default: 42, the KCLA paper\'s)')
    g.add_argument('--quick', action='store_true',
                   help='a reduced grid of a few minutes on a CPU (few epochs, one seed, the smallest depth); '
                        'flags given as well win')
    g.add_argument('--shard', type=parse_shard, default=None, metavar='I/N',
                   help='run only shard I of N (1 <= I <= N): every N-th run of the grid, for N independent jobs')

    g = parser.add_argument_group('data')
    g.add_argument('--dataset', nargs='+', default=None, metavar='NAME',
                   help='timm dataset names, e.g. torch/cifar10 torch/cifar100 (default: digits, the embedded data; '
                        'with --data-dir: the paper\'s datasets)')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root (torch/ download folder or '
                                                                   'ImageFolder) for every non-embedded dataset')
    g.add_argument('--dataset-download', action='store_true', help='download torch/ datasets if missing')

    g = parser.add_argument_group('training (default: the paper\'s recipe, as `timm-layerattn train --recipe`)')
    g.add_argument('--epochs', type=int_arg(min=1), default=None,
                   help='train every run this many epochs; the warm-up and lr decay points are scaled to the same '
                        'fractions of the run')
    g.add_argument('--batch-size', '-b', type=int_arg(min=1), default=None, help='batch size (lr scaled along)')
    g.add_argument('--train-samples', type=int_arg(min=1), default=None, metavar='N', help='train on N images only')
    g.add_argument('--val-samples', type=int_arg(min=1), default=None, metavar='N', help='validate on N images only')
    g.add_argument('--workers', '-j', type=int_arg(min=0), default=None, metavar='N', help='data loader processes')
    g.add_argument('--device', default=None, help='cuda, cpu, ... (default: cuda if available)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='mixed precision (default: on for CUDA)')

    g = parser.add_argument_group('output')
    g.add_argument('--output', '-o', default=None, metavar='DIR',
                   help='reproduction folder (default: output/reproduce/TABLE); results.md, results.csv and runs/')
    g.add_argument('--metric', default='final', choices=METRICS,
                   help='final = the last epoch\'s accuracy (default); best = the best epoch\'s, as the official '
                        'CIFAR scripts report (a model selected on the test set)')
    g.add_argument('--overwrite', action='store_true', help='redo runs that were trained with other settings')
    g.add_argument('--collect', action='store_true', help='train nothing: write the results of the finished runs')
    g.add_argument('--dry-run', action='store_true', help='list the runs and their state, train nothing')
    g.add_argument('--launcher', default='local', choices=('local', 'submitit'),
                   help='local = one run after another in this process (default); submitit = a job array')
    g.add_argument('--verbose', action='store_true', help='the trainer\'s lines for every epoch')
    g.add_argument('--progress', action='store_true', help='the trainer\'s progress bars')
    add_slurm_arguments(parser)


def _apply_quick(args: argparse.Namespace, table: Table) -> None:
    """`--quick`: the table's preset for every option not given."""
    if not args.quick:
        return
    for key, value in table.quick.items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)


def _datasets(args: argparse.Namespace, table: Table) -> List[str]:
    from ...data import is_embedded_dataset
    datasets = args.dataset or (list(table.datasets) if args.data_dir else ['digits'])
    datasets = list(dict.fromkeys(datasets))
    real = [d for d in datasets if not is_embedded_dataset(d)]
    if real and not args.data_dir:
        raise UserError(f'--dataset {" ".join(real)} needs --data-dir (the dataset root; with --dataset-download the '
                        f'folder to download to)')
    if args.data_dir and not real:
        raise UserError(f'--data-dir is for files on disk, but --dataset {" ".join(datasets)} is embedded '
                        f'(drop --data-dir, or name a dataset such as torch/cifar100)')
    if real and not Path(args.data_dir).exists() and not (
            args.dataset_download and all(d.lower().startswith('torch/') for d in real)):
        raise UserError(f'dataset folder not found: {args.data_dir}'
                        + (' (add --dataset-download to fetch it)' if any(d.lower().startswith('torch/') for d in real)
                           else ''))
    return datasets


def _selection(args: argparse.Namespace, table: Table):
    depths = args.depths or list(table.depths)
    bad = [d for d in depths if d not in table.depths]
    if bad:
        raise UserError(f'{table.name} has depth{"s" if len(table.depths) > 1 else ""} '
                        f'{", ".join(map(str, table.depths))}, not {", ".join(map(str, bad))}')
    keys = [r.key for r in table.rows]
    rows = args.rows or keys
    bad = [r for r in rows if r not in keys]
    if bad:
        raise UserError(f'{table.name} has no row {", ".join(map(repr, bad))}; its rows: {", ".join(keys)}')
    seeds = [args.first_seed + k for k in range(args.seeds or table.seeds)]
    return depths, rows, seeds


def _check_models(runs, table: Table) -> None:
    """Refuse a grid with unregistered models or kwargs a model refuses, before anything is trained."""
    import timm
    import timm_layerattn  # noqa: F401  (registers the models)
    unknown = sorted({r.model for r in runs if not timm.is_model(r.model)})
    if unknown:
        raise UserError(f'{table.name}: model{"s" if len(unknown) > 1 else ""} not registered: {", ".join(unknown)}'
                        f'; see `timm-layerattn list`, or leave those rows out with --rows')
    for model, kwargs in dict.fromkeys((r.model, r.kwargs) for r in runs):
        try:
            timm.create_model(model, device='meta', **dict(kwargs))
        except (TypeError, ValueError) as e:
            raise UserError(f'{table.name}: cannot create {model} with {dict(kwargs)}: {e}') from None


def _check_output(out: Path, table: Table, create: bool, collect: bool) -> None:
    """The folder is a reproduction of this table, or new / empty; it is marked as one when `create`."""
    from ..._utils.files import MARKER_KEY, atomic_file, check_writable, output_marker, read_marker
    marker = read_marker(out / MARKER_FILE)
    if marker is not None and marker.get('kind') == 'reproduce':
        if marker.get('table') != table.name:
            raise UserError(f'{out} holds a reproduction of {marker.get("table")}, not of {table.name}; choose '
                            f'another --output')
    elif collect:
        raise UserError(f'--collect: {out} holds no reproduction (no {MARKER_FILE}); give the --output of one')
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f'output folder {out} is not a reproduction folder (no {MARKER_FILE}); choose another '
                        f'--output')
    elif out.exists() and not out.is_dir():
        raise UserError(f'output folder {out} exists and is not a folder')
    check_writable(out)
    if create and marker is None:
        with atomic_file(out / MARKER_FILE, 'w') as f:
            json.dump({MARKER_KEY: output_marker('reproduce', table=table.name)}, f, indent=1)


def _settings(args: argparse.Namespace, table: Table):
    from .runs import Settings
    return Settings(
        recipe=table.recipe, epochs=args.epochs, batch_size=args.batch_size, train_samples=args.train_samples,
        val_samples=args.val_samples, data_dir=args.data_dir, dataset_download=args.dataset_download,
        workers=args.workers, device=args.device, amp=args.amp, verbose=args.verbose, progress=args.progress)


def _check_train_args(runs, settings, open_data: bool) -> None:
    """The trainer's own checks of each dataset's arguments (recipe, combinations) and, with `open_data`, the
    datasets opened once, before any run: a missing dataset is one error, and a download (--dataset-download)
    happens here once, not in every job at the same time."""
    from ...train import create_datasets, resolve_args
    from .runs import train_namespace
    for run in {r.dataset: r for r in runs}.values():
        args = resolve_args(train_namespace(run, settings, Path(run.folder), None))
        if open_data:
            create_datasets(args)


def _count(n: int, noun: str) -> str:
    return f'{n} {noun}{"s" if n != 1 else ""}'


def run(args: argparse.Namespace) -> int:
    from .launch import check_submitit, run_locally, run_submitit
    from .report import collect, results_markdown, write_reports
    from .runs import plan_runs, run_state, shard_runs, train_values
    table = TABLES[args.table]
    _apply_quick(args, table)
    datasets = _datasets(args, table)
    depths, rows, seeds = _selection(args, table)
    grid = plan_runs(table, datasets, depths, rows, seeds)
    if not grid:
        raise UserError(f'{table.name}: no run in this selection (rows {", ".join(rows)} at depths '
                        f'{", ".join(map(str, depths))}; the paper reports some rows at some depths only)')
    runs = shard_runs(grid, args.shard) if args.shard else grid
    _check_models(runs, table)
    settings = _settings(args, table)
    _check_train_args(runs, settings, open_data=not (args.collect or args.dry_run))
    if args.launcher == 'submitit' and not (args.collect or args.dry_run):
        check_submitit(args)
    out = Path(args.output or Path('output') / 'reproduce' / table.name)
    _check_output(out, table, create=not (args.collect or args.dry_run), collect=args.collect)

    states = {r: run_state(out / r.folder, train_values(r, settings)) for r in runs}
    stale = [r for r in runs if states[r][0] == 'stale']
    if stale and not args.overwrite and not args.collect:
        many = len(stale) > 1
        raise UserError(f'{len(stale)} run{"s" if many else ""} in --output {"have" if many else "has"} other settings '
                        f'({stale[0].folder}: {states[stale[0]][1]}); --overwrite redoes {"them" if many else "it"}, '
                        f'or choose another --output')
    done = [r for r in runs if states[r][0] == 'done']
    todo = [r for r in runs if states[r][0] != 'done']
    cells = len({(r.depth, r.row) for r in grid})
    shard = f', shard {args.shard[0]}/{args.shard[1]}: {len(runs)} of them' if args.shard else ''
    print(f'timm-layerattn reproduce {table.name}: {_count(len(grid), "run")} ({_count(len(datasets), "dataset")} x '
          f'{_count(cells, "cell")} x {_count(len(seeds), "seed")}{shard}); {len(done)} finished earlier, '
          f'{0 if args.collect else len(todo)} to train -> {out}', flush=True)
    if args.dry_run:
        for r in runs:
            print(f'  {states[r][0]:<6} {r.folder}  {r.model}' + (f' {dict(r.kwargs)}' if r.kwargs else ''))
        return 0

    failed: Optional[list] = []
    if todo and not args.collect:
        if args.launcher == 'submitit':
            failed = run_submitit(todo, settings, out, args.overwrite, args, name=f'reproduce-{table.name}')
        else:
            failed = run_locally(todo, settings, out, args.overwrite, debug=getattr(args, 'debug', False))
        if failed is None:  # submitted, not waited for
            return 0
    cells = collect(table, grid, settings, out, args.metric)
    paths = write_reports(table, cells, settings, out, args.metric)
    print()
    print(results_markdown(table, cells, settings, args.metric))
    print(f'results: {paths[1]} and {paths[0].name}', flush=True)
    if failed:
        print(f'{len(failed)} of {len(todo)} runs failed (see above); the same command retries them and keeps the '
              f'finished ones', file=sys.stderr)
        return 1
    return 0
