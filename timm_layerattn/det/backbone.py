"""`LayerAttnResNet`: every layer-attention ResNet of this package as an MMDetection 3.x backbone.

One class serves every registered arch (`type='LayerAttnResNet', arch='resnet50_kcla'`). The trunk is the
timm model itself, run through its `forward_intermediates` (the method timm's `getter` feature wrapper
calls): these nets carry attention state from block to block and across stages, so their features
cannot be taken by re-running children one by one (docs/design/layer_attention.md#la-feature-getter).
Stages after the last requested output are pruned, as timm's feature wrapper does.

The options follow mmdet's own `ResNet` with the official KCLA / MRLA detection backbones' semantics:

* `out_indices`: 0-based stage indices as in mmdet (timm's index 0 is the stem, so stage `i` is timm `i + 1`).
* `frozen_stages`: -1 none, 0 the stem, `n` the stem plus stages 1..n *including their attention modules*:
  eval mode (so their DropPath is off too) and `requires_grad=False`.
* `norm_eval`: every BatchNorm, trunk and attention alike, stays in eval mode while training.
* `norm_cfg`: `BN` or `SyncBN` (converted with `nn.SyncBatchNorm.convert_sync_batchnorm`), `requires_grad`,
  optional `eps` / `momentum`, applied to all BatchNorms.
* `drop_path_rate`: drop rate of the layer-attention branch (the trunk residual is never dropped). The
  official KCLA detection code hard-codes 0.2 and the MRLA one uses none; configs should set it.
* Weights, one `init_cfg` entry, checked when the backbone is built (a missing file, or Hub weights neither
  cached nor downloadable, fail before any dataset is built):
  - `dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')` (what the shipped configs use): the trunk from a
    plain timm ResNet's ImageNet weights (downloaded from the Hub on first use, or a local file), attention
    modules freshly initialised; see `trunk.py`.
  - `dict(type='Pretrained', checkpoint=..., prefix=None)`: layer-attention weights of this arch from a
    `.safetensors` / torch file, `local-dir:DIR`, `hf-hub:ORG/NAME` or a URL; official KCLA / MRLA
    classification checkpoints (`module.` prefixes, official key names) are remapped by the model family's
    checkpoint filter (from the family registry), and a detector checkpoint works with `prefix='backbone.'`.
    Loading is strict apart from the classifier and pruned stages.
  Both load in `init_weights()`, as every mmdet backbone does. `pretrained=True` instead lets timm load the
  arch's own weights at construction (e.g. `arch='hf-hub:ORG/NAME'`); `init_weights()` then leaves them alone.
"""
import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize, update_init_info
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoints.io import check_state_dict_values, select_prefix, strip_shared_prefix
from ..checkpoints.match import match_keys
from ..checkpoints.rules import registered_rules
from .checkpoint import fetch_source, read_state_dict
from .trunk import TimmTrunkInit

__all__ = ['LayerAttnResNet']

_NORM_TYPES = ('BN', 'BN2d', 'SyncBN')
# init_cfg types this class applies itself (mmengine never sees them).
_WEIGHT_TYPES = ('Pretrained', 'TimmTrunk')


@MODELS.register_module()
class LayerAttnResNet(BaseModule):
    """Layer-attention ResNet (KCLA, MRLA-L, MRLA-B, ...) backbone returning a tuple of stage features."""

    def __init__(
            self,
            arch: str = 'resnet50_kcla',
            out_indices: Sequence[int] = (0, 1, 2, 3),
            frozen_stages: int = -1,
            norm_eval: bool = True,
            norm_cfg: Optional[Dict[str, Any]] = None,
            with_cp: bool = False,
            drop_path_rate: Optional[float] = None,
            pretrained: Union[bool, str] = False,
            style: str = 'pytorch',
            init_cfg: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None,
            **model_kwargs,
    ):
        """
        Args:
            arch: A timm model name of this package (`timm-layerattn list`), optionally with a tag, or
                `hf-hub:ORG/NAME` / `local-dir:DIR` holding one.
            out_indices: Stages whose outputs are returned (0-based, mmdet convention).
            frozen_stages: Freeze the stem (0) and stages up to this one (1-based); -1 freezes nothing.
            norm_eval: Keep every BatchNorm in eval mode during training.
            norm_cfg: `dict(type='BN' | 'SyncBN', requires_grad=True[, eps, momentum])`.
            with_cp: Activation checkpointing per block (less memory, more compute).
            drop_path_rate: Layer-attention branch drop rate; `None` keeps the arch default (KCLA 0.2, MRLA 0).
            pretrained: True: timm loads the arch's own weights now. A string: shorthand for
                `init_cfg=dict(type='Pretrained', checkpoint=pretrained)`.
            style: Only 'pytorch' (stride on the 3x3 conv), accepted for config compatibility.
            init_cfg: mmengine init config; a `Pretrained` or `TimmTrunk` entry is loaded by this class (see
                module doc), after any other entry.
            **model_kwargs: Further `timm.create_model` arguments (e.g. `head_dim`, `output_stride`).
        """
        if style != 'pytorch':
            raise ValueError(f"LayerAttnResNet only has the 'pytorch' style (stride on the 3x3 conv), got {style!r}")
        if isinstance(pretrained, str):
            if init_cfg is not None:
                raise ValueError('give the checkpoint either as pretrained=<str> or in init_cfg, not both')
            init_cfg, pretrained = dict(type='Pretrained', checkpoint=pretrained), False
        init_cfgs = [] if init_cfg is None else [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)
        weight_cfgs = [c for c in init_cfgs if c.get('type') in _WEIGHT_TYPES]
        other_cfgs = [c for c in init_cfgs if c.get('type') not in _WEIGHT_TYPES]
        if len(weight_cfgs) > 1:
            raise ValueError('init_cfg may hold at most one weights entry (Pretrained or TimmTrunk)')
        if pretrained and init_cfgs:
            raise ValueError('pretrained=True (timm loads the weights) excludes init_cfg')
        # mmengine must not run its own PretrainedInit on this module: our keys live under `model.` and
        # official checkpoints need remapping. Other initialisers stay with mmengine.
        super().__init__(init_cfg=other_cfgs or None)
        weights = copy.deepcopy(dict(weight_cfgs[0])) if weight_cfgs else None
        self._checkpoint: Optional[Dict[str, Any]] = None
        self._trunk_init: Optional[TimmTrunkInit] = None
        if weights is not None and weights.pop('type') == 'Pretrained':
            unknown = sorted(set(weights) - {'checkpoint', 'prefix', 'map_location'})  # weights are read to CPU
            if unknown:
                raise ValueError(f"init_cfg of type 'Pretrained' takes checkpoint and prefix, not {unknown}")
            if not weights.get('checkpoint'):
                raise ValueError("init_cfg of type 'Pretrained' needs a 'checkpoint'")
            fetch_source(weights['checkpoint'])  # now: a bad path must not wait for the datasets
            self._checkpoint = weights
        elif weights is not None:
            unknown = sorted(set(weights) - {'checkpoint', 'strict'})
            if unknown or 'checkpoint' not in weights:
                raise ValueError(f"init_cfg of type 'TimmTrunk' takes checkpoint (required) and strict, "
                                 f"got {sorted(weights)}")
            self._trunk_init = TimmTrunkInit(**weights)  # resolves (downloads on first use) now

        if 'features_only' in model_kwargs or 'num_classes' in model_kwargs:
            raise ValueError('LayerAttnResNet builds a headless feature extractor; drop features_only / num_classes')
        if drop_path_rate is not None:
            model_kwargs['drop_path_rate'] = drop_path_rate
        model = timm.create_model(arch, pretrained=bool(pretrained), num_classes=0, global_pool='', **model_kwargs)
        stage_names = tuple(getattr(model, 'stage_names', ()))
        if not stage_names or not hasattr(model, 'forward_intermediates'):
            raise ValueError(f'{arch!r} is not a layer-attention ResNet of timm_layerattn (no stages to extract)')
        self.arch = arch
        self.num_stages = len(stage_names)

        if isinstance(out_indices, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
            raise ValueError(f'out_indices must be a sequence of integer stage indices, got {out_indices!r}')
        out_indices = tuple(out_indices)
        if not out_indices or len(set(out_indices)) != len(out_indices) or list(out_indices) != sorted(out_indices) \
                or not all(0 <= i < self.num_stages for i in out_indices):
            raise ValueError(f'out_indices must be increasing stage indices in [0, {self.num_stages - 1}], '
                             f'got {out_indices}')
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) \
                or not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}')
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._stage_names = stage_names
        # Stages past the last output are replaced by empty ones (their weights are not loaded either).
        self._pruned_stages = stage_names[max(out_indices) + 1:]
        self._timm_indices = model.prune_intermediate_layers([i + 1 for i in out_indices], prune_head=True)
        self.feature_info = [dict(model.feature_info[i]) for i in self._timm_indices]
        self._classifier = model.pretrained_cfg.get('classifier', 'fc')

        model = _apply_norm_cfg(model, norm_cfg)
        if with_cp:
            model.set_grad_checkpointing(True)
        self.model = model
        self._freeze_stages()
        if self._trunk_init is not None:
            self._trunk_init.check(self.model, what=f'{type(self).__name__} {arch!r}')

    @property
    def out_channels(self) -> List[int]:
        """Channels of the returned features (FPN `in_channels`)."""
        return [info['num_chs'] for info in self.feature_info]

    @property
    def strides(self) -> List[int]:
        """Strides of the returned features relative to the input."""
        return [info['reduction'] for info in self.feature_info]

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        frozen_stages = set(self._stage_names[:self.frozen_stages])
        # The stem is every top-level module that is not a stage (the head is pruned to nothing).
        return [m for name, m in self.model.named_children() if name not in self._stage_names or name in frozen_stages]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> 'LayerAttnResNet':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(x, indices=self._timm_indices, intermediates_only=True))

    def init_weights(self) -> None:
        """Apply the other init_cfg entries (mmengine), then load the `Pretrained` / `TimmTrunk` weights.

        The timm model keeps the official initialisation it got at construction; its own `init_weights`
        is never re-run, so weights timm loaded (`pretrained=True`) are not overwritten.
        """
        if self._is_init:
            print_log(f'init_weights of {type(self).__name__} has been called more than once.',
                      logger='current', level=logging.WARNING)
            return
        if self.init_cfg:
            initialize(self, self.init_cfg)
        if self._checkpoint is not None:
            source = self._checkpoint['checkpoint']
            self.load_weights(source, prefix=self._checkpoint.get('prefix'))
            if hasattr(self, '_params_init_info'):
                update_init_info(self, init_info=f'Loaded by {type(self).__name__} from {source}')
        if self._trunk_init is not None:
            summary = self._trunk_init.load(self.model)
            if hasattr(self, '_params_init_info'):
                update_init_info(self, init_info=f'{type(self).__name__}: {summary}')
        self._is_init = True

    def load_weights(self, source: str, prefix: Optional[str] = None) -> None:
        """Load trunk weights from `source` (see `read_state_dict`), strictly but for classifier / pruned stages.

        Args:
            source: File, `local-dir:DIR`, `hf-hub:ORG/NAME[@REV]` or URL.
            prefix: Keep only keys under this prefix and strip it (e.g. 'backbone.' for a detector checkpoint).
        """
        state_dict, _ = read_state_dict(source)
        if prefix:
            state_dict = select_prefix(state_dict, prefix)
            if not state_dict:
                raise ValueError(f'no key of {source} starts with prefix {prefix!r}')
        state_dict = strip_shared_prefix(state_dict, 'model.')  # saved from this wrapper
        filter_fn = _family_filter(self.model, self.arch)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, self.model)
        check_state_dict_values(state_dict, f'checkpoint {source}')
        classifiers = (self._classifier,) if isinstance(self._classifier, str) else tuple(self._classifier)
        ignored = tuple(f'{name}.' for name in (*classifiers, *self._pruned_stages))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignored)}
        # Check everything before copying anything, so a checkpoint that does not fit leaves the model untouched.
        found = match_keys(state_dict, self.model.state_dict())
        if not found.ok:
            def some(keys: List[str]) -> str:
                return ', '.join(keys[:4]) + (f', ... ({len(keys)} in all)' if len(keys) > 4 else '')
            mismatched = [f'{k} {found.shapes[k][0]} (model {found.shapes[k][1]})' for k in found.mismatched]
            problems = [f'{what}: {some(keys)}' for what, keys in (
                ('missing keys', found.missing), ('unexpected keys', found.unexpected),
                ('shape mismatches', mismatched)) if keys]
            # The families' own hints, worded for this backbone (e.g. a KCLA head dim that differs).
            hints = [h for rules in registered_rules() for h in rules.hints(
                state_dict, getattr(self.model, 'cfg', None), mismatched=found.mismatched, backbone=True)]
            hint = f" ({'; '.join(hints)})" if hints else ''
            raise ValueError(f'checkpoint {source} does not fit {self.arch}: ' + '; '.join(problems) + hint)
        self.model.load_state_dict(state_dict)
        print_log(f'{type(self).__name__}: loaded {len(state_dict)} tensors from {source}', logger='current')


def _family_filter(model: nn.Module, arch: str) -> Optional[Callable[..., Dict[str, torch.Tensor]]]:
    """The checkpoint filter of `model`'s family (official layouts -> ours), from the family registry.

    The architecture is the model's own (`arch` may be an `hf-hub:` / `local-dir:` source); `None` for a model
    that is not one of this package's.
    """
    from ..families import find_family
    family = find_family((getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or arch)
    return family.rules.filter if family is not None and family.rules is not None else None


def _apply_norm_cfg(model: nn.Module, norm_cfg: Optional[Dict[str, Any]]) -> nn.Module:
    """BN -> SyncBN conversion and BatchNorm settings from an mmcv-style `norm_cfg`."""
    cfg = dict(norm_cfg or dict(type='BN'))
    norm_type = cfg.pop('type', 'BN')
    requires_grad = cfg.pop('requires_grad', True)
    settings = {k: cfg.pop(k) for k in ('eps', 'momentum') if k in cfg}
    if norm_type not in _NORM_TYPES:
        raise ValueError(f'norm_cfg type must be one of {_NORM_TYPES} (the nets are built with BatchNorm), '
                         f'got {norm_type!r}')
    if cfg:
        raise ValueError(f'unsupported norm_cfg keys for LayerAttnResNet: {sorted(cfg)}')
    eps, momentum = settings.get('eps', 1e-5), settings.get('momentum', 0.1)
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f'norm_cfg eps must be a number in (0, 1), got {eps!r}')
    if momentum is not None and (not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1):
        raise ValueError(f'norm_cfg momentum must be a number in [0, 1] or None, got {momentum!r}')
    if norm_type == 'SyncBN':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            for k, v in settings.items():
                setattr(m, k, v)
            for p in m.parameters():
                p.requires_grad = requires_grad
    return model
