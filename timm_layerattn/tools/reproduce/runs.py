"""The runs of a reproduction: the grid (table x datasets x depths x rows x seeds), shards of it, the state of
each run on disk, and one run as a job (`execute`), which trains through `timm-layerattn train` in-process.

A run lives in its own folder, `runs/<dataset>/<row>-d<depth>/seed<seed>/`: the trainer's run folder (log.json,
summary.csv, checkpoints), plus `run.json`, the run's settings written before training starts, and
`result.json`, written atomically once it has finished. A run is finished when its result.json holds the same
settings; a run with a run.json and a `last.pth.tar` resumes from that checkpoint; any other restarts.
"""
import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..._utils.errors import UserError
from ..._utils.files import atomic_file
from .tables import Table, dataset_key

__all__ = ['Run', 'Settings', 'plan_runs', 'shard_runs', 'parse_shard', 'train_values', 'scaled_schedule',
           'run_state', 'execute', 'read_json', 'RESULT_FILE', 'SPEC_FILE']

RESULT_FILE = 'result.json'
SPEC_FILE = 'run.json'
LAST_CHECKPOINT = 'last.pth.tar'


@dataclass(frozen=True)
class Run:
    """One training of the grid: a table row at one depth on one dataset with one seed."""
    table: str
    row: str
    label: str
    dataset: str
    depth: int
    seed: int
    model: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()  # model kwargs, sorted (hashable)

    @property
    def folder(self) -> str:
        """Where the run lives, relative to the output folder."""
        data = re.sub(r'[^A-Za-z0-9._-]+', '-', self.dataset).strip('-') or 'imagefolder'
        return f'runs/{data}/{self.row}-d{self.depth}/seed{self.seed}'

    def describe(self) -> str:
        return f'{dataset_key(self.dataset) or "imagefolder"} {self.label} d{self.depth} seed {self.seed}'


@dataclass(frozen=True)
class Settings:
    """What every run of one reproduction shares: the recipe and its overrides, data and output options."""
    recipe: str
    epochs: Optional[int] = None  # shorten (or lengthen) every run, the recipe's schedule scaled along
    batch_size: Optional[int] = None
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    data_dir: Optional[str] = None
    dataset_download: bool = False
    workers: Optional[int] = None
    device: Optional[str] = None
    amp: Optional[bool] = None
    verbose: bool = False  # the trainer's epoch lines
    progress: bool = False  # the trainer's progress bars


def plan_runs(table: Table, datasets: Sequence[str], depths: Sequence[int], rows: Sequence[str],
              seeds: Sequence[int]) -> List[Run]:
    """The grid in its one canonical order (dataset, depth, row as in the paper, seed): shards partition it."""
    runs = []
    for dataset in datasets:
        for depth, row in table.cells():
            if depth not in depths or row.key not in rows:
                continue
            for seed in seeds:
                runs.append(Run(table.name, row.key, row.label, dataset, depth, seed, row.model_name(depth),
                                tuple(sorted(row.kwargs.items()))))
    return runs


def parse_shard(text: str) -> Tuple[int, int]:
    """`I/N` -> (I, N), 1 <= I <= N (argparse type)."""
    m = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text or '')
    if m is None or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise argparse.ArgumentTypeError(f'expected I/N with 1 <= I <= N (e.g. 1/4), got {text!r}')
    return int(m.group(1)), int(m.group(2))


def shard_runs(runs: Sequence[Run], shard: Tuple[int, int]) -> List[Run]:
    """Shard I of N: every N-th run of the whole grid from the I-th, whatever has finished, so the shards of one
    grid never overlap and together cover it; the cells' seeds and depths spread evenly over the shards."""
    i, n = shard
    return list(runs[i - 1::n])


# ---------------------------------------------------------------------------------------------------------------
# Trainer arguments
# ---------------------------------------------------------------------------------------------------------------

def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def scaled_schedule(recipe: str, epochs: int) -> Dict[str, Any]:
    """Trainer values that run `recipe` for `epochs` epochs with its schedule's shape: the warm-up and the lr
    decay points at the same fractions of the run (a recipe counted in iterations, such as as-cifar's 64k with
    decays at 32k and 48k, becomes epochs with decays at 1/2 and 3/4 of them)."""
    from ...train.recipes import BASE_DEFAULTS, RECIPES
    r = dict(BASE_DEFAULTS, **RECIPES[recipe])
    if r['iters']:
        total = float(r['iters'])
        decay_points = list(r['decay_iters'] or [])
        warmup = 0.0  # warm-up epochs of an iteration recipe have no length in its own unit; none has one
    else:
        total = float(r['epochs'])
        decay_points = list(r['decay_milestones'])
        warmup = float(r['warmup_epochs'])
    values: Dict[str, Any] = dict(epochs=epochs, warmup_epochs=_round(warmup * epochs / total))
    if r['sched'] == 'multistep':
        values['decay_milestones'] = [max(1, _round(p * epochs / total)) for p in decay_points]
        values['decay_iters'] = []  # decays counted in epochs now (the recipe's iteration points are replaced)
    elif r['sched'] == 'step':
        values['decay_epochs'] = r['decay_epochs'] * epochs / total
    return values


def train_values(run: Run, settings: Settings) -> Dict[str, Any]:
    """The trainer arguments (argparse dests) that decide the run's result: its spec, as run.json records it."""
    values: Dict[str, Any] = dict(model=run.model, model_kwargs=dict(run.kwargs), recipe=settings.recipe,
                                  dataset=run.dataset, seed=run.seed)
    if settings.epochs is not None:
        values.update(scaled_schedule(settings.recipe, settings.epochs))
    for name in ('batch_size', 'train_samples', 'val_samples'):
        if getattr(settings, name) is not None:
            values[name] = getattr(settings, name)
    return json.loads(json.dumps(values))  # as read back from a file (lists, not tuples)


def train_namespace(run: Run, settings: Settings, run_dir: Path, resume: Optional[Path]) -> argparse.Namespace:
    """The `timm-layerattn train` arguments of the run, as its parser would give them, with the spec's values."""
    from ...train import parse_args
    args = parse_args(['--model', run.model])
    for key, value in train_values(run, settings).items():
        setattr(args, key, value)
    from ...data import is_embedded_dataset
    args.data_dir = None if is_embedded_dataset(run.dataset) else settings.data_dir
    args.dataset_download = settings.dataset_download
    args.workers, args.device, args.amp = settings.workers, settings.device, settings.amp
    args.output = str(run_dir)
    args.resume = str(resume) if resume is not None else ''
    args.overwrite = resume is None  # a restart replaces what an interrupted attempt left
    args.quiet, args.progress = not settings.verbose, settings.progress
    return args


# ---------------------------------------------------------------------------------------------------------------
# State on disk
# ---------------------------------------------------------------------------------------------------------------

def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """A JSON object from `path`, None if it is missing or not one (a file is only ever written whole)."""
    try:
        obj = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def run_state(run_dir: Path, spec: Dict[str, Any]) -> Tuple[str, Optional[str]]:
    """('done' | 'resume' | 'new' | 'stale', why stale): a finished run, one to resume from its last checkpoint, one
    to (re)start, or a folder holding a run with other settings (redone only with --overwrite)."""
    result = read_json(run_dir / RESULT_FILE)
    if result is not None:
        return ('done', None) if result.get('spec') == spec else ('stale', _diff(result.get('spec'), spec))
    started = read_json(run_dir / SPEC_FILE)
    if started is None:
        leftovers = run_dir.is_dir() and any(run_dir.iterdir())
        return ('stale', 'it holds files but no run.json') if leftovers else ('new', None)
    if started.get('spec') != spec:
        return 'stale', _diff(started.get('spec'), spec)
    return ('resume', None) if (run_dir / LAST_CHECKPOINT).is_file() else ('new', None)


# Values that follow from others (the scaled schedule follows --epochs): named after those in a difference.
_DERIVED = ('warmup_epochs', 'decay_milestones', 'decay_iters', 'decay_epochs')


def _diff(old: Any, new: Dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return 'its settings are unreadable'
    keys = sorted((k for k in set(old) | set(new) if old.get(k) != new.get(k)), key=lambda k: (k in _DERIVED, k))
    return ', '.join(f'{k} {old.get(k)!r} there, {new.get(k)!r} now' for k in keys[:2])


def _write_json(path: Path, obj: Dict[str, Any]) -> None:
    with atomic_file(path, 'w') as f:
        json.dump(obj, f, indent=1)


def execute(run: Run, settings: Settings, out_dir: str, overwrite: bool = False) -> Dict[str, Any]:
    """Train one run (or resume it, or do nothing if it has finished) and return its result.json contents.

    Module-level and given only picklable values, so a submitit job can run it in another process.
    """
    from ...train import train
    run_dir = Path(out_dir) / run.folder
    spec = train_values(run, settings)
    state, why = run_state(run_dir, spec)
    if state == 'done':
        return read_json(run_dir / RESULT_FILE)
    if state == 'stale':
        if not overwrite:
            raise UserError(f'{run_dir} holds a run with other settings ({why}); pass --overwrite to redo it')
        (run_dir / RESULT_FILE).unlink(missing_ok=True)
        state = 'new'
    resume = run_dir / LAST_CHECKPOINT if state == 'resume' else None
    args = train_namespace(run, settings, run_dir, resume)
    _write_json(run_dir / SPEC_FILE, dict(run=asdict(run), spec=spec))
    start = time.time()
    result = train(args)
    last = result.history[-1] if result.history else {}
    record = dict(
        run=asdict(run), spec=spec, model=run.model, num_params=result.num_params, num_classes=result.num_classes,
        final_top1=last.get('eval_top1'), best_top1=result.best_metric, best_epoch=result.best_epoch,
        epochs=len(result.history), eval_count=last.get('eval_count'), resumed=resume is not None,
        train_time_s=round(sum(h['train_time'] for h in result.history), 3),
        wall_time_s=round(time.time() - start, 3), finished=time.strftime('%Y-%m-%d %H:%M:%S'))
    record = json.loads(json.dumps(record))  # as read back from the file, for a job's caller
    _write_json(run_dir / RESULT_FILE, record)
    return record
