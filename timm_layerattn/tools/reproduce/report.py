"""Aggregation of finished runs into `results.csv` and `results.md`: per cell (dataset, depth, row) the mean and
sample standard deviation over the seeds of the table's metric, the parameter count, and the paper's values.
"""
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..._utils.files import atomic_file
from ...version import __version__
from .runs import RESULT_FILE, Run, Settings, read_json, train_values
from .tables import PaperCell, Table, dataset_key

__all__ = ['Cell', 'mean_std', 'collect', 'write_reports', 'METRICS']

# `--metric`: which accuracy of a run counts. 'final' is the last epoch's (no model selection on the test set);
# 'best' is the best epoch's, as the official KCLA / MRLA CIFAR scripts report it.
METRICS = ('final', 'best')
CSV_FIELDS = ('table', 'dataset', 'depth', 'row', 'label', 'model', 'model_kwargs', 'num_classes', 'params',
              'params_m', 'paper_params_m', 'metric', 'n', 'planned', 'mean', 'std', 'paper_mean', 'paper_std',
              'seeds', 'values')


def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (n - 1; None for fewer than two values); (None, None) for none."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class Cell:
    """One cell of the table: a row at one depth on one dataset, with the results of its finished runs."""
    dataset: str
    depth: int
    row: str
    label: str
    model: str
    kwargs: Dict[str, Any]
    planned: int = 0
    seeds: List[int] = field(default_factory=list)
    values: List[float] = field(default_factory=list)  # the metric of each finished run, in seed order
    params: Optional[int] = None
    num_classes: Optional[int] = None
    paper: PaperCell = PaperCell()

    @property
    def mean_std(self):
        return mean_std(self.values)


def _paper_cell(table: Table, cell: Cell) -> PaperCell:
    """The paper's values for the cell: all of them on the paper's dataset; on another dataset only the parameter
    count of the paper's column with as many classes (the same architecture), and no accuracy."""
    paper = table.row(cell.row).paper
    own = paper.get((dataset_key(cell.dataset), cell.depth))
    if own is not None:
        return own
    if cell.num_classes is not None:
        for (ds, depth), value in paper.items():
            if depth == cell.depth and {'cifar10': 10, 'cifar100': 100}.get(ds) == cell.num_classes:
                return PaperCell(params_m=value.params_m)
    return PaperCell()


def run_value(result: Dict[str, Any], table: Table, metric: str) -> Optional[float]:
    top1 = result.get('final_top1' if metric == 'final' else 'best_top1')
    if not isinstance(top1, (int, float)):
        return None
    return 100.0 - top1 if table.metric == 'error' else float(top1)


def collect(table: Table, runs: Sequence[Run], settings: Settings, out_dir: Path, metric: str = 'final') -> List[Cell]:
    """The cells of the planned `runs`, in grid order, each with the results of its runs that finished with these
    settings (a result.json of other settings does not count)."""
    cells: Dict[tuple, Cell] = {}
    for run in runs:
        key = (run.dataset, run.depth, run.row)
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = Cell(run.dataset, run.depth, run.row, run.label, run.model, dict(run.kwargs))
        cell.planned += 1
        result = read_json(out_dir / run.folder / RESULT_FILE)
        if result is None or result.get('spec') != train_values(run, settings):
            continue
        value = run_value(result, table, metric)
        if value is None:
            continue
        cell.seeds.append(run.seed)
        cell.values.append(value)
        cell.params, cell.num_classes = result.get('num_params'), result.get('num_classes')
    for cell in cells.values():
        cell.paper = _paper_cell(table, cell)
    return list(cells.values())


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return '' if x is None else f'{x:.{digits}f}'


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return '–'
    return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v!r}' for k, v in kwargs.items())


def results_csv(table: Table, cells: Sequence[Cell], metric: str) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for c in cells:
        mean, std = c.mean_std
        writer.writerow(dict(
            table=table.name, dataset=c.dataset, depth=c.depth, row=c.row, label=c.label, model=c.model,
            model_kwargs=json.dumps(c.kwargs, sort_keys=True) if c.kwargs else '', num_classes=c.num_classes or '',
            params=c.params or '', params_m=_fmt(c.params / 1e6 if c.params else None, 4),
            paper_params_m=_fmt(c.paper.params_m), metric=f'{table.metric} ({metric})', n=len(c.values),
            planned=c.planned, mean=_fmt(mean, 4), std=_fmt(std, 4), paper_mean=_fmt(c.paper.mean),
            paper_std=_fmt(c.paper.std), seeds=' '.join(map(str, c.seeds)),
            values=' '.join(f'{v:.4f}' for v in c.values)))
    return buf.getvalue()


def _settings_text(table: Table, settings: Settings, metric: str) -> str:
    length = 'as the paper trains'
    if settings.epochs is not None:
        length = (f'shortened to {settings.epochs} epoch{"s" if settings.epochs > 1 else ""} (warm-up and lr decays '
                  f'scaled to the same fractions)')
    extra = [f'{n.replace("_", " ")} {getattr(settings, n)}' for n in ('batch_size', 'train_samples', 'val_samples')
             if getattr(settings, n) is not None]
    what = {'top1': 'top-1 accuracy', 'error': 'top-1 error'}[table.metric]
    return (f'Recipe `{settings.recipe}`, {length}' + (f'; {", ".join(extra)}' if extra else '') + '. '
            f'Cells: {what} (%) of the {"last" if metric == "final" else "best"} epoch, mean ± sample SD over the '
            f'finished runs (seeds); params (M) as built for the dataset\'s classes. The paper columns hold what the '
            f'paper reports (accuracy only on the paper\'s own dataset).')


def results_markdown(table: Table, cells: Sequence[Cell], settings: Settings, metric: str) -> str:
    head = {'top1': 'top-1 (%)', 'error': 'error (%)'}[table.metric]
    lines = [f'# {table.title}', '', f'Measured by `timm-layerattn reproduce {table.name}` (timm-layerattn '
             f'{__version__}). {_settings_text(table, settings, metric)}']
    if table.note:
        lines += ['', table.note]
    for dataset in dict.fromkeys(c.dataset for c in cells):
        lines += ['', f'## {dataset or "ImageFolder"}', '',
                  f'| model | depth | params (M) | paper params (M) | {head} | paper {head} | runs |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for c in (c for c in cells if c.dataset == dataset):
            name = f'`{c.model}`' + (f' ({_kwargs_text(c.kwargs)})' if c.kwargs else '')
            mean, std = c.mean_std
            lines.append(
                f'| {c.label}: {name} | {c.depth} | {_fmt(c.params / 1e6 if c.params else None) or "–"} | '
                f'{_fmt(c.paper.params_m) or "–"} | {_pm(mean, std)} | {_pm(c.paper.mean, c.paper.std)} | '
                f'{len(c.values)}/{c.planned} |')
    return '\n'.join(lines) + '\n'


def write_reports(table: Table, cells: Sequence[Cell], settings: Settings, out_dir: Path,
                  metric: str = 'final') -> List[Path]:
    """Write results.csv and results.md (each atomically) and return their paths."""
    paths = [out_dir / 'results.csv', out_dir / 'results.md']
    for path, text in zip(paths, (results_csv(table, cells, metric),
                                  results_markdown(table, cells, settings, metric))):
        with atomic_file(path, 'w') as f:
            f.write(text)
    return paths
