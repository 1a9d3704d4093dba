"""Shared helpers of the MMDetection tests: a tiny synthetic COCO-format dataset and config overrides."""
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / 'mmdet_configs'
CLASSES = ('box', 'disc')


def _polygon(kind: int, x0: float, y0: float, w: float, h: float) -> Sequence[float]:
    if kind == 0:
        return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
    cx, cy = x0 + w / 2, y0 + h / 2
    pts = []
    for i in range(24):
        a = 2 * math.pi * i / 24
        pts += [cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)]
    return pts


def make_coco(
        root: Path,
        num_images: int = 6,
        size: Tuple[int, int] = (128, 160),
        classes: Sequence[str] = CLASSES,
        seed: int = 0,
) -> Dict[str, Any]:
    """Write `num_images` PNGs with 1-3 solid boxes / discs each, plus a COCO instances JSON (boxes and masks).

    Boxes are category 1 (`classes[0]`), discs category 2; all of `classes` are listed as categories.
    Layout: `root/images/*.png`, `root/annotations.json`. Returns the annotation dict.
    """
    import cv2
    rng = np.random.default_rng(seed)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    height, width = size
    images, annotations = [], []
    for img_id in range(1, num_images + 1):
        img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 2))
            w, h = (float(v) for v in rng.uniform(32, 64, 2))
            x0, y0 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            poly = _polygon(kind, x0, y0, w, h)
            color = (40, 200, 240) if kind == 0 else (240, 80, 40)
            cv2.fillPoly(img, [np.round(np.array(poly).reshape(-1, 2)).astype(np.int32)], color)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=img_id, category_id=kind + 1, iscrowd=0,
                bbox=[x0, y0, w, h], area=w * h if kind == 0 else math.pi * w * h / 4, segmentation=[poly]))
        name = f'{img_id:04d}.png'
        cv2.imwrite(str(root / 'images' / name), img)
        images.append(dict(id=img_id, file_name=name, height=height, width=width))
    coco = dict(
        images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(classes)])
    (root / 'annotations.json').write_text(json.dumps(coco))
    return coco


def point_to_data(cfg, root: Path, scale: Tuple[int, int] = (160, 128), num_classes: Optional[int] = None) -> None:
    """Point a COCO config's train / val / test data at `make_coco(root)` and shrink the image scale.

    With `num_classes` the dataset uses the two synthetic classes and the heads are resized to match;
    without, the config's COCO classes and 80-class heads stay (use `make_coco(classes=COCO classes)`).
    """
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[split]
        loader.num_workers = 0
        loader.persistent_workers = False
        ds = loader.dataset
        ds.data_root = str(root)
        ds.ann_file = 'annotations.json'
        ds.data_prefix = dict(img='images/')
        if num_classes is not None:
            ds.metainfo = dict(classes=CLASSES)
        if split == 'train_dataloader':
            ds.filter_cfg = dict(filter_empty_gt=True, min_size=8)
        for step in ds.pipeline:
            if step['type'] == 'Resize':
                step['scale'] = scale
    for split in ('val_evaluator', 'test_evaluator'):
        cfg[split].ann_file = str(root / 'annotations.json')
    if num_classes is not None:
        roi_head = cfg.model.roi_head
        roi_head.bbox_head.num_classes = num_classes
        if 'mask_head' in roi_head:
            roi_head.mask_head.num_classes = num_classes


def lighten(cfg, iters: int, lr: float = 0.01, batch_size: int = 2) -> None:
    """Short iteration-based run at a constant lr, with fewer proposals / RoIs than the COCO recipe (CPU speed)."""
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
    cfg.param_scheduler = []
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.auto_scale_lr.enable = False
    cfg.train_dataloader.batch_size = batch_size
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.train_dataloader.pop('batch_sampler', None)
    model = cfg.model
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 64
    model.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    quiet(cfg, log_interval=1)
    cfg.log_processor = dict(by_epoch=False, window_size=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=iters, by_epoch=False)


def quiet(cfg, log_interval: int = 1) -> None:
    """Per-iteration log entries, no visualisation output."""
    cfg.default_hooks.logger.interval = log_interval
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook', draw=False)
    cfg.log_level = 'WARNING'
