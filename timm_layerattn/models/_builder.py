"""Model construction shared by every family module: every entrypoint's body is `build_model(variant, ...)`.

The variant's family (`families.family_of`) gives its architecture config, the kwargs it accepts
(`Family.args`, folded into the config by `apply_model_args`) and its checkpoint rules; the config's type
gives the trunk class (`register_trunk`). So a family module is data: configs, a `Family` and entrypoints.
"""
from dataclasses import replace
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

from ..families import apply_model_args, family_of
from ..pretrained import check_pretrained_source

__all__ = ['build_model', 'build_la_model', 'register_trunk']

_TRUNKS: Dict[type, Type[nn.Module]] = {}


def register_trunk(cfg_cls: type, model_cls: Type[nn.Module]) -> None:
    """Architecture configs of type `cfg_cls` build `model_cls` (called as `model_cls(cfg=..., **kwargs)`)."""
    _TRUNKS[cfg_cls] = model_cls


def build_model(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered variant: its architecture with the family's kwargs applied, its trunk class, its
    family's checkpoint filter and one feature level per stage plus the stem."""
    family = family_of(variant)
    arch = apply_model_args(variant, replace(family.models[variant], name=variant), kwargs)
    rules = family.rules
    return build_la_model(
        _TRUNKS[type(arch)], variant, pretrained, arch, rules.filter if rules is not None else None,
        default_out_indices=tuple(range(arch.num_feature_levels)), **kwargs)


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
