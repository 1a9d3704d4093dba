"""Smoke run of an MMDetection config: a few training iterations and a COCO evaluation on generated data.

`run_smoke(config)` is what `timm-layerattn det-smoke CONFIG` runs: it writes a tiny COCO set
(`tiny_coco.make_tiny_coco`) into a temporary folder, points the config's train / val / test data at it with a
small image scale, trains `iters` iterations (one epoch of `iters * batch_size` images), then runs the
validation and test loops with the config's own `CocoMetric`s. The temporary folder is removed afterwards,
on errors and SIGTERM too.

What is changed in the config, and why: the data (paths, image scale, no worker processes), the length of
training, no checkpoint saving, fewer RPN proposals and sampled RoIs (half the CPU time), and `score_thr=0`
at test time (a net trained for two iterations scores every class about evenly, below the usual 0.05, and
COCO evaluation of no detections gives no metrics). The trunk starts random unless `pretrained=True` keeps
the config's `init_cfg` (timm ImageNet weights, downloaded on first use). The model, its heads and classes,
the optimizer, the schedulers and the pipelines' other steps are the config's own; `cfg_options` (applied
after the sampling budgets, before the rest) can change any of them.

`point_to_data` and the other helpers are also used by the detection tests.
"""
import contextlib
import io
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .._utils.errors import UserError, first_line
from .._utils.files import _terminate_cleanly
from .tiny_coco import SHAPES, make_tiny_coco

__all__ = ['SMOKE_SCALE', 'SmokeResult', 'run_smoke', 'point_to_data', 'datasets_of', 'evaluators_of',
           'drop_weights_init']

# (width, height) as mmdet's `Resize(scale=...)` takes it; the generated images are this size.
SMOKE_SCALE = (160, 128)
_WEIGHT_INIT_TYPES = ('Pretrained', 'TimmTrunk')
_SPLITS = ('train', 'val', 'test')
_runs = itertools.count()


@dataclass
class SmokeResult:
    """What a smoke run measured."""
    config: str
    detector: str
    backbone: str
    trunk_init: str
    num_images: int
    device: str
    losses: List[Dict[str, float]] = field(default_factory=list)  # per iteration: 'loss' and its parts
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # 'val' / 'test' -> CocoMetric values
    seconds: float = 0.0


def datasets_of(loader: Any) -> List[Any]:
    """The innermost dataset configs of a dataloader config (through RepeatDataset-style `dataset` wrappers)."""
    ds = loader.dataset
    while 'dataset' in ds:
        ds = ds.dataset
    if 'datasets' in ds:  # ConcatDataset
        raise UserError(f'det-smoke needs one dataset per split; the config concatenates {len(ds.datasets)}')
    return [ds]


def evaluators_of(cfg: Any, split: str) -> List[Any]:
    """The metric configs of `val_evaluator` / `test_evaluator` (a dict or a list of them)."""
    ev = cfg.get(f'{split}_evaluator')
    if ev is None:
        return []
    return list(ev) if isinstance(ev, (list, tuple)) else [ev]


def _set_scale(pipeline: Sequence[Any], scale: Tuple[int, int]) -> None:
    for step in pipeline or ():
        if 'scale' in step:
            step['scale'] = scale
        if 'scales' in step:
            step['scales'] = [scale]
        if 'transforms' in step:  # RandomChoice / RandomApply style nesting
            for inner in step['transforms']:
                _set_scale(inner if isinstance(inner, (list, tuple)) else [inner], scale)


def point_to_data(cfg: Any, root: Union[str, Path], scale: Tuple[int, int] = SMOKE_SCALE,
                  num_classes: Optional[int] = None) -> None:
    """Point a COCO config's train / val / test data and evaluators at `make_tiny_coco(root)`; shrink the scale.

    With `num_classes` the dataset uses the two synthetic classes and the R-CNN heads are resized to match;
    without, the config's classes and heads stay (write the set with `make_tiny_coco(classes=...)` of them).
    """
    root = Path(root)
    for split in _SPLITS:
        loader = cfg.get(f'{split}_dataloader')
        if loader is None:
            continue
        loader.num_workers = 0
        loader.persistent_workers = False
        for ds in datasets_of(loader):
            ds.data_root = str(root)
            ds.ann_file = 'annotations.json'
            ds.data_prefix = dict(img='images/')
            if num_classes is not None:
                ds.metainfo = dict(classes=SHAPES)
            _set_scale(ds.get('pipeline'), scale)
    for split in ('val', 'test'):
        for metric in evaluators_of(cfg, split):
            metric.ann_file = str(root / 'annotations.json')
    if num_classes is not None:
        roi_head = cfg.model.roi_head
        roi_head.bbox_head.num_classes = num_classes
        if 'mask_head' in roi_head:
            roi_head.mask_head.num_classes = num_classes


def drop_weights_init(backbone: Any) -> None:
    """Remove the weight-loading entries (`Pretrained`, `TimmTrunk`) of a backbone config: random trunk."""
    init_cfg = backbone.get('init_cfg')
    if init_cfg is None:
        return
    entries = [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)
    kept = [c for c in entries if c.get('type') not in _WEIGHT_INIT_TYPES]
    backbone.init_cfg = None if not kept else kept[0] if len(kept) == 1 else kept
    if isinstance(backbone.get('pretrained'), str):
        backbone.pretrained = None


def _load_config(config: Union[str, Path], cfg_options: Optional[Dict[str, Any]]) -> Any:
    """The config, with the smaller R-CNN sampling budgets (`_lighten`), then the user's options merged."""
    from mmengine.config import Config
    try:
        cfg = Config.fromfile(str(config))
    except Exception as e:  # syntax errors, missing `_base_` files, failed `custom_imports`
        raise UserError(f'cannot read config {config}: {type(e).__name__}: {first_line(e)}') from e
    _lighten(cfg.get('model') or {})
    try:
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
    except Exception as e:
        raise UserError(f'--cfg-options do not apply to {config}: {type(e).__name__}: {first_line(e)}') from e
    missing = [k for k in ('model', 'train_dataloader', 'train_cfg', 'optim_wrapper') if not cfg.get(k)]
    if missing:
        raise UserError(f'{config} is not an MMDetection training config: it has no {", ".join(missing)}')
    return cfg


def _lighten(model: Any) -> None:
    """Fewer RPN proposals and sampled RoIs than the COCO recipe (2000 / 512): half the CPU time of a smoke run
    on a handful of small images, same model."""
    train_cfg, test_cfg = model.get('train_cfg') or {}, model.get('test_cfg') or {}
    for part, settings in ((train_cfg.get('rpn_proposal'), dict(nms_pre=200, max_per_img=200)),
                           (test_cfg.get('rpn'), dict(nms_pre=200, max_per_img=100))):
        if isinstance(part, dict):
            part.update({k: v for k, v in settings.items() if k in part})
    rcnn = train_cfg.get('rcnn')
    if isinstance(rcnn, dict) and isinstance(rcnn.get('sampler'), dict) and 'num' in rcnn.sampler:
        rcnn.sampler.num = min(rcnn.sampler.num, 64)


def _check_coco(cfg: Any, name: str) -> List[str]:
    """The config's class names; refuses datasets and metrics that cannot read a COCO-format set."""
    from mmdet.datasets import CocoDataset
    from mmdet.evaluation import CocoMetric
    from mmdet.registry import DATASETS, METRICS
    from mmengine.registry import init_default_scope

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    classes = None
    for split in _SPLITS:
        loader = cfg.get(f'{split}_dataloader')
        for ds in datasets_of(loader) if loader is not None else ():
            cls = DATASETS.get(ds.get('type')) if isinstance(ds.get('type'), str) else ds.get('type')
            if not (isinstance(cls, type) and issubclass(cls, CocoDataset)):
                raise UserError(f'{name}: det-smoke generates a COCO-format set, but the {split} dataset is '
                                f'{ds.get("type")!r} (not a CocoDataset)')
            classes = classes or (ds.get('metainfo') or {}).get('classes') or cls.METAINFO['classes']
        for metric in evaluators_of(cfg, split) if split != 'train' else ():
            cls = METRICS.get(metric.get('type')) if isinstance(metric.get('type'), str) else metric.get('type')
            if not (isinstance(cls, type) and issubclass(cls, CocoMetric)):
                raise UserError(f'{name}: det-smoke evaluates with CocoMetric, but the {split} evaluator is '
                                f'{metric.get("type")!r}')
    if not _evaluated_splits(cfg):
        raise UserError(f'{name}: the config sets up no validation or test (val_cfg / test_cfg, their dataloader '
                        f'and evaluator) to run')
    return list(classes)


def _shorten(cfg: Any, iters: int, batch_size: int, work_dir: Path, verbose: bool) -> None:
    """Train `iters` iterations of `batch_size` images, evaluate once, save nothing, log little."""
    train_cfg = cfg.train_cfg
    if train_cfg.get('type') == 'EpochBasedTrainLoop':
        train_cfg.update(max_epochs=1, val_begin=1, val_interval=1)
    elif train_cfg.get('type') == 'IterBasedTrainLoop':
        train_cfg.update(max_iters=iters, val_begin=1, val_interval=iters)
    else:
        raise UserError(f'det-smoke runs EpochBasedTrainLoop and IterBasedTrainLoop configs, not '
                        f'{train_cfg.get("type")!r}')
    cfg.train_dataloader.batch_size = batch_size
    for split in ('val', 'test'):
        if cfg.get(f'{split}_dataloader') is not None:
            cfg[f'{split}_dataloader'].batch_size = 1
    test_cfg = cfg.model.get('test_cfg') or {}
    for part in (test_cfg.get('rcnn'), test_cfg):  # two-stage detectors, then one-stage ones
        if part is not None and 'score_thr' in part:
            part.score_thr = 0.0
            break
    cfg.load_from, cfg.resume = None, False
    cfg.work_dir = str(work_dir)
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1)
    if 'visualization' in cfg.default_hooks:
        cfg.default_hooks.visualization.draw = False
    cfg.log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
    cfg.log_level = 'INFO' if verbose else 'WARNING'
    cfg.launcher = 'none'
    # Names of our own: mmengine keeps loggers and visualizers by name (mmdet's configs name theirs
    # 'visualizer'), and an instance of an earlier run would write into that run's deleted folder.
    cfg.experiment_name = f'det-smoke_{Path(cfg.filename or "config").stem}_{os.getpid()}_{next(_runs)}'
    if cfg.get('visualizer') is not None:
        cfg.visualizer.name = cfg.experiment_name


@contextlib.contextmanager
def _on_device(device: str) -> Iterator[str]:
    """Run mmengine's Runner on `device` ('cpu', or 'auto': mmengine's own choice, a GPU if there is one).

    mmengine picks its device once, when imported (`mmengine.device.utils.DEVICE`), and its Runner has no
    option for it; the CPU choice is set there for the duration of the run only.
    """
    import mmengine.device.utils as device_utils
    if device == 'auto':
        yield device_utils.DEVICE
        return
    previous, device_utils.DEVICE = device_utils.DEVICE, device
    try:
        yield device
    finally:
        device_utils.DEVICE = previous


def _recorder(result: SmokeResult, echo: Callable[[str], None]) -> Any:
    from mmengine.hooks import Hook

    class _Recorder(Hook):
        """Records and echoes the losses of every iteration and the metrics of each evaluation."""
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            losses = {k: float(v) for k, v in (outputs or {}).items()}
            result.losses.append(losses)
            echo(f'iter {runner.iter + 1}/{runner.max_iters}  ' + '  '.join(f'{k} {v:.4f}' for k, v in losses.items()))

        def after_val_epoch(self, runner, metrics=None):
            self._metrics('val', metrics)

        def after_test_epoch(self, runner, metrics=None):
            self._metrics('test', metrics)

        def _metrics(self, split, metrics):
            result.metrics[split] = {k: float(v) for k, v in (metrics or {}).items()}
            echo(f'{split:<5} ' + '  '.join(f'{k} {v:.3f}' for k, v in result.metrics[split].items()))

    return _Recorder()


def _close_file_logs(experiment_name: str) -> None:
    """Close the log files of the run's mmengine loggers (they are in the temporary folder about to go), also
    when the Runner failed half-way through its construction."""
    import logging

    from mmengine.logging import MMLogger
    for name, logger in list(MMLogger._instance_dict.items()):
        if name.startswith(experiment_name):
            for handler in list(logger.handlers):
                if isinstance(handler, logging.FileHandler):
                    handler.close()
                    logger.removeHandler(handler)


def run_smoke(
        config: Union[str, Path],
        *,
        iters: int = 2,
        batch_size: int = 2,
        pretrained: bool = False,
        cfg_options: Optional[Dict[str, Any]] = None,
        device: str = 'cpu',
        seed: int = 0,
        verbose: bool = False,
        echo: Optional[Callable[[str], None]] = None,
) -> SmokeResult:
    """Train `iters` iterations of `config` on a generated tiny COCO set, then evaluate it (see module doc).

    Args:
        config: Path of an MMDetection config (Faster / Mask R-CNN style, COCO datasets and `CocoMetric`).
        iters: Training iterations; the set has `iters * batch_size` images.
        batch_size: Training images per iteration.
        pretrained: Keep the config's backbone weights init (e.g. `TimmTrunk`: downloads on first use).
        cfg_options: mmengine `--cfg-options`-style overrides, applied before the smoke settings.
        device: 'cpu', or 'auto' for mmengine's choice.
        seed: Seed of the data and of the run.
        verbose: mmengine's INFO log and pycocotools' output instead of only the result lines.
        echo: Where the result lines go; by default `sys.stdout` as it is when called (mmengine's and
            pycocotools' output is held back, not these lines).

    Raises:
        UserError: A config that cannot be read, built or run on COCO data; non-finite losses; no metrics.
    """
    import timm_layerattn.det  # noqa: F401  (LayerAttnResNet, TimmTrunk and the checkpoint loaders)

    if echo is None:
        stream = sys.stdout

        def echo(line: str) -> None:
            print(line, file=stream, flush=True)
    if iters < 1 or batch_size < 1:
        raise UserError(f'iters and batch_size must be >= 1, got {iters} and {batch_size}')
    if device not in ('cpu', 'auto'):
        raise UserError(f"device must be 'cpu' or 'auto', got {device!r}")
    start = time.perf_counter()
    name = Path(config).name
    cfg = _load_config(config, cfg_options)
    classes = _check_coco(cfg, name)
    backbone = cfg.model.get('backbone') or {}
    if not pretrained:
        drop_weights_init(backbone)
    init = backbone.get('init_cfg')
    trunk_init = 'random' if not init else ', '.join(
        f"{c.get('type')} {c.get('checkpoint', '')}".strip() for c in ([init] if isinstance(init, dict) else init))
    num_images = iters * batch_size
    result = SmokeResult(
        config=name, detector=str(cfg.model.get('type')),
        backbone=f"{backbone.get('type')} {backbone.get('arch', '')}".strip(), trunk_init=trunk_init,
        num_images=num_images, device=device)
    with _terminate_cleanly(), tempfile.TemporaryDirectory(prefix='timm-layerattn-det-smoke-') as tmp:
        data = Path(tmp) / 'data'
        make_tiny_coco(data, num_images=num_images, size=SMOKE_SCALE[::-1], classes=classes, seed=seed)
        point_to_data(cfg, data, scale=SMOKE_SCALE)
        _shorten(cfg, iters, batch_size, Path(tmp) / 'work', verbose)
        cfg.randomness = dict(seed=seed)
        echo(f'{name}: {result.detector}, backbone {result.backbone}, trunk init: {trunk_init}')
        with _on_device(device) as used:
            result.device = used
            echo(f'data: {num_images} generated images {SMOKE_SCALE[0]}x{SMOKE_SCALE[1]} (boxes and polygons of 2 '
                 f'of the config\'s {len(classes)} classes), batch {batch_size}, device {used}')
        with _on_device(device), _quiet(verbose):
            try:
                runner = _build_runner(cfg, name)
                runner.register_hook(_recorder(result, echo))
                _run(runner, cfg, name, result)
            finally:
                _close_file_logs(cfg.experiment_name)
    _check(result, cfg, name)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Hold back what mmengine and pycocotools print (the result lines go to the `echo` given)."""
    if verbose:
        yield
        return
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _build_runner(cfg: Any, name: str) -> Any:
    from mmengine.runner import Runner

    from .checkpoint import WeightsNotFound
    try:
        return Runner.from_cfg(cfg)
    except WeightsNotFound:  # already one clear line: where the weights are looked for, and the way out
        raise
    except (KeyError, ValueError, TypeError, AssertionError, ImportError, RuntimeError, OSError) as e:
        raise UserError(f'{name} does not build: {type(e).__name__}: {first_line(e)}') from e


def _run(runner: Any, cfg: Any, name: str, result: SmokeResult) -> None:
    try:
        runner.train()
    except Exception as e:
        raise UserError(f'{name}: training failed at iteration {len(result.losses) + 1}: '
                        f'{type(e).__name__}: {first_line(e)}') from e
    if 'test' in _evaluated_splits(cfg):
        try:
            runner.test()
        except Exception as e:
            raise UserError(f'{name}: the test loop failed: {type(e).__name__}: {first_line(e)}') from e


def _evaluated_splits(cfg: Any) -> List[str]:
    """'val' and / or 'test': the evaluations the config sets up (loop, data and evaluator)."""
    return [s for s in ('val', 'test') if cfg.get(f'{s}_cfg') is not None and cfg.get(f'{s}_dataloader') is not None
            and evaluators_of(cfg, s)]


def _check(result: SmokeResult, cfg: Any, name: str) -> None:
    """Finite losses for every iteration, and each configured COCO metric in each evaluation."""
    for i, losses in enumerate(result.losses, 1):
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        if bad:
            raise UserError(f'{name}: non-finite training loss at iteration {i}: {", ".join(bad)}')
    if not result.losses:
        raise UserError(f'{name}: no training iteration ran')
    for split in _evaluated_splits(cfg):
        for metric in evaluators_of(cfg, split):
            kinds = metric.get('metric', 'bbox')
            for kind in [kinds] if isinstance(kinds, str) else kinds:
                key = f"{metric.get('prefix') or 'coco'}/{kind}_mAP"
                if key not in result.metrics.get(split, {}):
                    raise UserError(f'{name}: the {split} evaluation gave no {key} (got '
                                    f'{sorted(result.metrics.get(split, {})) or "nothing"})')

