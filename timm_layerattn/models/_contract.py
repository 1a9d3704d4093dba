"""What the trunk classes share of timm's model contract: the checks of timm's constructor arguments, the classifier
`reset_classifier` builds, and one wording for inputs that cannot be images of a model."""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import create_classifier

from ..layers._checks import check_choice, check_int, check_rate

__all__ = ['POOL_TYPES', 'check_trunk_args', 'check_pool_for_classifier', 'classifier_head', 'check_image']

# Global pooling types of timm's `SelectAdaptivePool2d` ('' for none).
POOL_TYPES = ('', 'avg', 'max', 'avgmax', 'catavgmax', 'fast', 'fastavg', 'fastmax', 'fastavgmax', 'fastcatavgmax')


def check_pool_for_classifier(name: str, global_pool: str, num_classes: int) -> None:
    """A classifier needs pooled features: `global_pool=''` (unpooled maps) only with `num_classes=0`."""
    if global_pool == '' and num_classes > 0:
        raise ValueError(f"{name}: global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}; "
                         f"a classifier takes pooled features (global_pool='avg')")


def check_trunk_args(
        name: str,
        num_classes: Any,
        in_chans: Any,
        global_pool: Any,
        output_stride: Any,
        drop_rate: Any,
) -> Tuple[int, int, int, float]:
    """timm's constructor arguments of a CNN trunk, each refused in one line naming the model; returns
    `(num_classes, in_chans, output_stride, drop_rate)`."""
    num_classes = check_int(name, 'num_classes', num_classes, minimum=0,
                            allowed='a non-negative integer (0: no classifier)')
    in_chans = check_int(name, 'in_chans', in_chans)
    check_choice(name, 'global_pool', global_pool, POOL_TYPES)
    check_pool_for_classifier(name, global_pool, num_classes)
    output_stride = check_int(name, 'output_stride', output_stride, allowed='one of 8, 16, 32')
    if output_stride not in (8, 16, 32):
        raise ValueError(f'{name}: output_stride must be one of 8, 16, 32, got {output_stride!r}')
    return num_classes, in_chans, output_stride, check_rate(name, 'drop_rate', drop_rate)


def classifier_head(
        name: str,
        num_features: int,
        num_classes: Any,
        global_pool: Optional[str],
        current_pool: str,
        training: bool,
        dd: Dict[str, Any],
) -> Tuple[int, nn.Module, nn.Module]:
    """`reset_classifier`'s `(num_classes, global_pool, classifier)`. `global_pool=None` keeps `current_pool`, but a
    new classifier on a model whose pooling was removed gets the default pooling back (timm's own checks call
    `reset_classifier(n)` after `reset_classifier(0, '')`)."""
    num_classes = check_int(name, 'num_classes', num_classes, minimum=0,
                            allowed='a non-negative integer (0: no classifier)')
    if global_pool is None:
        global_pool = current_pool or ('avg' if num_classes else '')
    check_choice(name, 'global_pool', global_pool, POOL_TYPES)
    check_pool_for_classifier(name, global_pool, num_classes)
    pool, classifier = create_classifier(num_features, num_classes, pool_type=global_pool, **dd)
    pool.train(training)
    classifier.train(training)
    return num_classes, pool, classifier


def check_image(name: str, in_chans: int, x: torch.Tensor, min_size: int = 1) -> None:
    """Refuse an input that cannot be an image of model `name` (4-D, `in_chans` channels, floating point, at least
    `min_size` px a side) with one line. `torch._assert` stays traceable (fx) and scriptable; shapes and dtype only,
    no data is read. An empty batch (B == 0) is valid and gives an empty output."""
    torch._assert(x.dim() == 4, f'{name} expects a 4-D input [B, {in_chans}, H, W]')
    torch._assert(x.shape[1] == in_chans, f'{name} expects {in_chans} input channels')
    torch._assert(
        x.is_floating_point(),
        f'{name} expects a floating-point input (convert integer images with .float() and normalise them)')
    if min_size <= 1:
        torch._assert(x.shape[2] * x.shape[3] > 0, f'{name} expects a non-empty image (H > 0 and W > 0)')
    else:  # two asserts: `and` of traced sizes is not traceable
        torch._assert(x.shape[2] >= min_size, f'{name} expects an image of at least one patch ({min_size}x{min_size} px)')
        torch._assert(x.shape[3] >= min_size, f'{name} expects an image of at least one patch ({min_size}x{min_size} px)')
