"""A tiny synthetic COCO-format instance dataset: solid boxes and discs on noise, with boxes and polygons.

Used by `timm-layerattn det-smoke` and the detection tests: enough for a detector config to load, train a few
iterations and be evaluated by mmdet's `CocoMetric` (bbox and segm), in seconds on a CPU. Needs only numpy
and Pillow (no MMDetection).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

__all__ = ['SHAPES', 'make_tiny_coco']

# The two kinds of object drawn: category 1 is a box, category 2 a disc.
SHAPES = ('box', 'disc')
_COLORS = ((240, 200, 40), (40, 80, 240))  # RGB: box, disc


def _polygon(kind: int, x0: float, y0: float, w: float, h: float) -> List[float]:
    """COCO polygon `[x1, y1, x2, y2, ...]` of a box (kind 0) or an ellipse inscribed in it (kind 1)."""
    if kind == 0:
        return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
    cx, cy = x0 + w / 2, y0 + h / 2
    pts: List[float] = []
    for i in range(24):
        a = 2 * math.pi * i / 24
        pts += [cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)]
    return pts


def make_tiny_coco(
        root: Union[str, Path],
        num_images: int = 4,
        size: Tuple[int, int] = (128, 160),
        classes: Sequence[str] = SHAPES,
        seed: int = 0,
) -> Dict[str, Any]:
    """Write `num_images` PNGs with 1-3 objects each and their COCO instances JSON (boxes and polygons).

    Objects are 32-64 pixels wide and high (above mmdet's default `min_size=32` filter). Boxes are category 1
    (`classes[0]`), discs category 2 (`classes[1]`); every name of `classes` is listed as a category, so a
    config can keep its own classes (e.g. COCO's 80) and its heads unchanged.

    Layout: `root/images/0001.png, ...`, `root/annotations.json`.

    Args:
        root: Folder to write into (created).
        num_images: Number of images (>= 1).
        size: `(height, width)` of the images, each at least 64.
        classes: Category names, at least two.
        seed: Seed of the layout and the background noise.

    Returns:
        The annotation dict written to `annotations.json`.
    """
    from PIL import Image, ImageDraw

    height, width = size
    if num_images < 1 or height < 64 or width < 64 or len(classes) < 2:
        raise ValueError(f'make_tiny_coco needs num_images >= 1, images of at least 64x64 and two classes; got '
                         f'{num_images}, {size}, {len(classes)}')
    root = Path(root)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for img_id in range(1, num_images + 1):
        img = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(0, 2))
            w, h = (float(v) for v in rng.uniform(32, 64, 2))
            x0, y0 = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            poly = _polygon(kind, x0, y0, w, h)
            draw.polygon([(round(x), round(y)) for x, y in zip(poly[::2], poly[1::2])], fill=_COLORS[kind])
            annotations.append(dict(
                id=len(annotations) + 1, image_id=img_id, category_id=kind + 1, iscrowd=0,
                bbox=[x0, y0, w, h], area=w * h if kind == 0 else math.pi * w * h / 4, segmentation=[poly]))
        name = f'{img_id:04d}.png'
        img.save(root / 'images' / name)
        images.append(dict(id=img_id, file_name=name, height=height, width=width))
    coco = dict(
        images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(classes)])
    (root / 'annotations.json').write_text(json.dumps(coco))
    return coco
