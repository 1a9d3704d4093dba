"""Model construction shared by every family module (one place for pretrained / feature handling)."""
from typing import Any, Callable, Optional, Sequence, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

from ..pretrained import check_pretrained_source

__all__ = ['build_la_model']


def build_la_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        model_cfg: Any,
        filter_fn: Optional[Callable] = None,
        default_out_indices: Sequence[int] = (0, 1, 2, 3, 4),
        **kwargs,
) -> nn.Module:
    """`build_model_with_cfg` with our conventions.

    Features always go through `forward_intermediates` (timm's `getter` wrapper): these nets carry
    state between layers, which the default wrapper (re-running children one by one) would drop.
    `default_out_indices` is the feature selection when the caller gives no `out_indices`.
    `pretrained=True` for a tag without weights fails up front with instructions (`PretrainedWeightsError`);
    a missing, unreadable, corrupt, non-finite or non-fitting checkpoint fails with one line naming the file
    and the problem (a `CheckpointError`, see `checkpoints/timm_entry.py`).
    """
    feature_cfg = dict(feature_cls='getter', out_indices=tuple(default_out_indices))
    if not pretrained:
        return build_model_with_cfg(
            model_cls, variant, pretrained, model_cfg=model_cfg, pretrained_filter_fn=filter_fn,
            feature_cfg=feature_cfg, **kwargs)
    source = check_pretrained_source(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    from ..checkpoints.timm_entry import build_checked  # only needed when loading weights
    return build_checked(
        build_model_with_cfg, model_cls, variant, pretrained, filter_fn, source,
        model_cfg=model_cfg, feature_cfg=feature_cfg, **kwargs)

