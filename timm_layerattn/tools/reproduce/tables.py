"""The papers' tables that `timm-layerattn reproduce` reruns, as data: rows (model + kwargs), the grid (datasets,
depths), the recipe, and what each paper reports beside each cell.

A row names its model with a `{depth}` placeholder (`cifar_resnet{depth}_kcla`) and the model kwargs that make
the row (Table V's ablations); `depths` limits a row to the depths the paper reports it at. Paper values are
keyed by (dataset, depth), the dataset as the last component of timm's name (`torch/cifar100` -> `cifar100`).
Parameter counts are the paper's, in millions, for that dataset's classes; `None` where the paper gives none.
The KCLA paper's Table I and Table V accuracies are absent from the text this package was built from (only
the parameter counts survived), so those cells hold `None` and results.md shows the parameter counts alone.
"""
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

__all__ = ['PaperCell', 'Row', 'Table', 'TABLES', 'dataset_key']


@dataclass(frozen=True)
class PaperCell:
    """What the paper reports for one (row, dataset, depth) cell: params (M) and the metric's mean and SD."""
    params_m: Optional[float] = None
    mean: Optional[float] = None
    std: Optional[float] = None


@dataclass(frozen=True)
class Row:
    key: str  # short, file-name safe: the run folders are named after it
    label: str  # as the paper writes the row
    model: str  # timm name, `{depth}` filled in per depth
    kwargs: Mapping[str, object] = field(default_factory=dict)
    depths: Optional[Tuple[int, ...]] = None  # None: every depth of the table
    paper: Mapping[Tuple[str, int], PaperCell] = field(default_factory=dict)

    def model_name(self, depth: int) -> str:
        return self.model.format(depth=depth)

    def has_depth(self, depth: int) -> bool:
        return self.depths is None or depth in self.depths


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    recipe: str  # `timm-layerattn train --recipe`
    datasets: Tuple[str, ...]  # the paper's, as timm dataset names
    depths: Tuple[int, ...]
    rows: Tuple[Row, ...]
    metric: str = 'top1'  # 'top1' (accuracy %) or 'error' (100 - top1)
    seeds: int = 5  # runs per cell in the paper
    quick: Mapping[str, object] = field(default_factory=dict)  # the `--quick` preset (reproduce option values)
    note: str = ''

    def row(self, key: str) -> Row:
        return next(r for r in self.rows if r.key == key)

    def cells(self):
        """(depth, row) of the paper's grid, depth-major as the papers print them."""
        return [(d, r) for d in self.depths for r in self.rows if r.has_depth(d)]


def dataset_key(dataset: str) -> str:
    """The paper-column key of a timm dataset name: `torch/cifar100` -> `cifar100` ('' for an ImageFolder)."""
    return (dataset or '').rstrip('/').split('/')[-1].lower()


def _params(depths: Tuple[int, ...], c10: Tuple[Optional[float], ...], c100: Tuple[Optional[float], ...]):
    """Paper cells holding parameter counts only, CIFAR-10 / CIFAR-100 per depth."""
    cells: Dict[Tuple[str, int], PaperCell] = {}
    for d, p10, p100 in zip(depths, c10, c100):
        if p10 is not None:
            cells[('cifar10', d)] = PaperCell(params_m=p10)
        if p100 is not None:
            cells[('cifar100', d)] = PaperCell(params_m=p100)
    return cells


_D = (20, 56, 110)
# `--quick`: a smoke run of the whole pipeline on the digits in minutes (batch 32: more steps than the papers' 128
# in few epochs), not numbers to set beside the paper's.
_QUICK_CIFAR = dict(epochs=5, seeds=1, depths=(20,), batch_size=32, train_samples=720)

# KCLA paper, Table I: CIFAR-10 / CIFAR-100 with the layer-attention papers' bottleneck ResNet-20/56/110. The
# paper reports Layer Att and MRLA-B at depths 20 and 56 only (their cost grows with depth).
KCLA_TABLE1 = Table(
    name='kcla-table1', title='KCLA paper, Table I: CIFAR-10 / CIFAR-100, ResNet-20 / 56 / 110',
    recipe='kcla-cifar', datasets=('torch/cifar10', 'torch/cifar100'), depths=_D, quick=_QUICK_CIFAR,
    rows=(
        Row('resnet', 'ResNet', 'cifar_resnet{depth}', paper=_params(_D, (0.22, 0.59, 1.17), (0.24, 0.61, 1.17))),
        Row('se', '+SE', 'cifar_resnet{depth}_se', paper=_params(_D, (0.24, 0.66, 1.28), (0.27, 0.68, 1.30))),
        Row('dia', '+DIANet', 'cifar_resnet{depth}_dia',
            paper=_params(_D, (0.44, 0.81, 1.37), (0.46, 0.83, 1.39))),
        Row('la', '+Layer Att', 'cifar_resnet{depth}_la', depths=(20, 56),
            paper=_params(_D, (0.23, 0.62), (0.25, 0.64))),
        Row('mrlal', '+MRLA-L', 'cifar_resnet{depth}_mrlal',
            paper=_params(_D, (0.23, 0.62, 1.21), (0.25, 0.65, 1.24))),
        Row('mrlab', '+MRLA-B', 'cifar_resnet{depth}_mrlab', depths=(20, 56),
            paper=_params(_D, (0.23, 0.62), (0.25, 0.64))),
        Row('dynlal', '+DLA-L', 'cifar_resnet{depth}_dynlal',
            paper=_params(_D, (0.41, 0.80, 1.39), (0.43, 0.82, 1.41))),
        Row('kcla', '+KCLA', 'cifar_resnet{depth}_kcla',
            paper=_params(_D, (0.23, 0.63, 1.22), (0.26, 0.65, 1.24))),
    ),
    note='The paper\'s "ResNet-110 1.17" in the CIFAR-10 column is the 100-class count (1.15 M at 10 classes).')


def _ablation(key: str, label: str, **kwargs) -> Row:
    return Row(key, label, 'cifar_resnet{depth}_kcla', kwargs=kwargs)


# KCLA paper, Table V: ablations of KCLA on ResNet-56, CIFAR-100, five runs each (the model kwargs are documented
# with the KCLA models; head dim 16 is the base).
KCLA_TABLE5 = Table(
    name='kcla-table5', title='KCLA paper, Table V: KCLA ablations, ResNet-56, CIFAR-100',
    recipe='kcla-cifar', datasets=('torch/cifar100',), depths=(56,),
    quick=dict(epochs=3, seeds=1, batch_size=32, train_samples=480),
    rows=(
        _ablation('base', 'Base (h=16)'),
        _ablation('a-same', '(a) same temperature', temperatures='equal'),
        _ablation('b-noexp', '(b) w/o Exp', key_exp=False),
        _ablation('c-noha', '(c) w/o HA', head_attn=False),
        _ablation('d-rla', '(d) RLA', form='rla'),
        _ablation('e-h2', '(e) h=2', head_dim=2),
        _ablation('e-h4', '(e) h=4', head_dim=4),
        _ablation('e-h8', '(e) h=8', head_dim=8),
        _ablation('e-h32', '(e) h=32', head_dim=32),
        _ablation('f-nocs', '(f) w/o cs', cross_stage=False),
    ))


def _error(params_m: Optional[float], c10: Tuple[float, float], c100: Tuple[float, float]):
    """Paper cells of the AS paper: test error mean / SD on CIFAR-10 and -100 (params: Table 1, 10 classes)."""
    return {('cifar10', 50): PaperCell(params_m, *c10), ('cifar100', 50): PaperCell(None, *c100)}


# Attention Shortcuts paper, Table 2: CIFAR test error of the final model, mean +- SD of 5 runs; parameter
# counts from its Table 1 (10 classes), where it gives them.
AS_TABLE2 = Table(
    name='as-table2', title='Attention Shortcuts paper, Table 2: CIFAR-10 / CIFAR-100 test error, ResNet-50 variants',
    recipe='as-cifar', datasets=('torch/cifar10', 'torch/cifar100'), depths=(50,), metric='error',
    quick=dict(epochs=2, seeds=1, batch_size=32, train_samples=128, val_samples=64),
    rows=(
        Row('as-out', 'AS_out-Net-50', 'cifar_resnet{depth}_as_out', paper=_error(12.7, (5.63, 0.13), (24.72, 0.35))),
        Row('as-kv', 'AS_KV-Net-50', 'cifar_resnet{depth}_as_kv', paper=_error(16.2, (5.97, 0.10), (24.92, 0.51))),
        Row('as-stages', 'AS_stages-ResNet-50', 'cifar_resnet{depth}_as_stages',
            paper=_error(None, (5.06, 0.09), (22.47, 0.34))),
        Row('resnet', 'ResNet-50', 'cifar_resnet{depth}', paper=_error(23.5, (5.10, 0.10), (22.12, 0.38))),
        Row('half', 'ResNet-50 0.5x', 'cifar_resnet{depth}_half', paper=_error(None, (5.74, 0.14), (24.08, 0.26))),
        Row('plain', 'plain-ResNet-50', 'cifar_resnet{depth}_plain',
            paper=_error(None, (8.41, 0.20), (40.02, 2.15))),
    ))

TABLES: Dict[str, Table] = {t.name: t for t in (KCLA_TABLE1, KCLA_TABLE5, AS_TABLE2)}
