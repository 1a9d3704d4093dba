"""`TimmTrunk`: the init type that starts a layer-attention backbone from a plain timm ResNet's ImageNet weights.

No layer-attention ImageNet weights are published, and the papers initialised their detection backbones from
ImageNet-trained nets; the nearest thing a user can get is timm's own ResNet with the same trunk (`resnet50`,
or `resnet50c` for the deep-stem MRLA-B nets) and freshly initialised attention modules. The shipped configs
say so with

    init_cfg=dict(type='TimmTrunk', checkpoint='resnet50.a1_in1k')

`checkpoint` is a timm model name with tag (its weights come from the Hugging Face Hub on first use and are
cached by huggingface_hub, as `timm.create_model(name, pretrained=True)` does), `hf-hub:ORG/NAME[@REV]`,
`local-dir:DIR` or a local `.safetensors` / torch file (read with `weights_only=True`). The copy itself is
`timm_layerattn.load_trunk`: every tensor whose name and shape match a non-attention tensor of the backbone.

Everything that can fail is checked when the initializer is built, which `LayerAttnResNet` does in its
`__init__`: the file is resolved (downloaded if needed) and its tensor names and shapes are matched against the
trunk. So MMDetection's `tools/train.py` fails within seconds, not in `init_weights()` after the datasets are
indexed. Offline without a cached copy the error names the cache and the `--cfg-options` that points at a
local file instead.

Registered in mmengine's root `WEIGHT_INITIALIZERS`, so every scope (mmdet's included) finds it.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import WEIGHT_INITIALIZERS

from ..checkpoints.io import check_state_dict_values, format_keys, strip_wrapper_prefixes
from ..convert import _is_attention_key  # the one rule of what load_trunk keeps at init
from ..convert import load_trunk
from .checkpoint import CFG_OPTION, HUB_FILES, WeightsNotFound, hub_file, read_state_dict, url_file

__all__ = ['TimmTrunkInit', 'TrunkWeights', 'resolve_trunk_weights', 'trunk_mismatch', 'plain_trunk_name']

_FILE_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.tar', '.ckpt')


@dataclass(frozen=True)
class TrunkWeights:
    """Where the trunk weights of a `TimmTrunk` init come from."""
    spec: str  # as written in the config
    path: str  # the local file that will be read
    origin: str  # for messages: 'timm resnet50.a1_in1k (Hub repo timm/resnet50.a1_in1k)', a file path, ...


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or '/' in spec or spec.startswith('~') or spec.lower().endswith(_FILE_SUFFIXES)


def resolve_trunk_weights(spec: str) -> TrunkWeights:
    """Resolve a `TimmTrunk` checkpoint to a local file now, downloading it on first use.

    Args:
        spec: A timm model name with tag ('resnet50.a1_in1k'; without a tag timm's default tag),
            `hf-hub:ORG/NAME[@REV]`, `local-dir:DIR` (its `model.safetensors` / `pytorch_model.bin`) or a file.

    Raises:
        WeightsNotFound: No such file / model / repo, or not cached and no download possible.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"init_cfg of type 'TimmTrunk' needs a 'checkpoint' string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith('hf-hub:'):
        repo = spec[len('hf-hub:'):]
        return TrunkWeights(spec, hub_file(repo, spec, 'model'), f'Hub repo {repo}')
    if spec.startswith('local-dir:'):
        folder = os.path.expanduser(spec[len('local-dir:'):])
        for name in HUB_FILES:
            if os.path.isfile(os.path.join(folder, name)):
                return TrunkWeights(spec, os.path.join(folder, name), os.path.join(folder, name))
        raise WeightsNotFound(f'backbone weights {spec!r}: {folder} holds none of {", ".join(HUB_FILES)}')
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return TrunkWeights(spec, path, path)
    if os.path.exists(path):
        raise WeightsNotFound(f'backbone weights {spec!r} is not a file')
    import timm
    if _looks_like_path(spec):
        raise WeightsNotFound(f'backbone weights file not found: {path} (a timm ResNet state dict, .safetensors or '
                              f'torch file; or a timm model name with tag such as resnet50.a1_in1k)')
    if not timm.is_model(spec):
        raise WeightsNotFound(
            f'backbone weights {spec!r} are neither a file nor a timm model name with weights (e.g. '
            f"'resnet50.a1_in1k'); set them with {CFG_OPTION}PATH_OR_NAME")
    try:
        cfg = timm.models.get_pretrained_cfg(spec, allow_unregistered=False)
    except RuntimeError:  # an unknown tag
        arch = spec.split('.', 1)[0]
        raise WeightsNotFound(f'backbone weights {spec!r}: timm has no such tag for {arch} (see '
                              f"timm.list_pretrained('{arch}.*'))") from None
    name = f'{cfg.architecture}.{cfg.tag}' if cfg.tag else cfg.architecture
    stem = cfg.architecture
    if cfg.file and os.path.isfile(cfg.file):
        return TrunkWeights(spec, cfg.file, f'timm {name} ({cfg.file})')
    if cfg.hf_hub_id:
        path = hub_file(cfg.hf_hub_id, spec, stem, prefer_cache=True)
        return TrunkWeights(spec, path, f'timm {name} (Hub repo {cfg.hf_hub_id})')
    if cfg.url:
        return TrunkWeights(spec, url_file(cfg.url, spec, stem), f'timm {name} ({cfg.url})')
    raise WeightsNotFound(f'backbone weights {spec!r}: timm has no weights for {name}')


def _tensor_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of a weights file's tensors; a safetensors file is not read beyond its header."""
    try:
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return {strip_wrapper_prefixes(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # not a safetensors file: the package's reader (weights_only, containers unwrapped)
        state_dict, _ = read_state_dict(path)
        return {k: tuple(v.shape) for k, v in state_dict.items()}


def plain_trunk_name(model: nn.Module) -> Optional[str]:
    """The timm ResNet whose weights fit `model`'s trunk ('resnet50', 'resnet101c' for a deep stem), if any."""
    import timm
    keys = model.state_dict().keys()
    blocks = [len({m.group(1) for k in keys for m in [re.match(rf'^layer{s}\.(\d+)\.', k)] if m}) for s in range(1, 5)]
    if not all(blocks) or not any(k.startswith('layer1.0.conv3.') for k in keys):
        return None
    name = f'resnet{3 * sum(blocks) + 2}' + ('c' if 'conv1.0.weight' in keys else '')
    return name if timm.is_model(name) else None


def _default_name(arch: str) -> str:
    """`arch.tag` with timm's default tag (what `timm.create_model(arch, pretrained=True)` loads)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(arch)
    return f'{arch}.{cfg.tag}' if cfg is not None and cfg.tag else arch


def trunk_mismatch(model: nn.Module, shapes: Mapping[str, Tuple[int, ...]]) -> List[str]:
    """The non-attention tensors of `model` that `load_trunk` would leave at init from a file with `shapes`.

    `num_batches_tracked` counters do not count (torchvision's files have none).
    """
    missing = []
    for k, v in model.state_dict().items():
        if _is_attention_key(k) or k.endswith('num_batches_tracked'):
            continue
        if shapes.get(k) != tuple(v.shape):
            missing.append(k)
    return missing


@WEIGHT_INITIALIZERS.register_module(name='TimmTrunk')
class TimmTrunkInit:
    """mmengine initializer: copy a plain timm ResNet's weights into a layer-attention trunk (`load_trunk`).

    Args:
        checkpoint: See `resolve_trunk_weights`; resolved (and downloaded on first use) when this is built.
        strict: Every non-attention tensor of the trunk must be in the file with its shape (checked by `check`
            before anything is read beyond the header); False loads what fits and leaves the rest at init.
    """

    def __init__(self, checkpoint: str, strict: bool = True):
        if not isinstance(strict, bool):
            raise ValueError(f"init_cfg of type 'TimmTrunk': strict must be True or False, got {strict!r}")
        self.weights = resolve_trunk_weights(checkpoint)
        self.checkpoint = checkpoint
        self.strict = strict
        self.wholemodule = False  # set by mmengine's `initialize`; the whole module is always the target

    def check(self, model: nn.Module, what: str = 'the backbone') -> None:
        """Refuse (strict) a file whose tensors do not cover `model`'s trunk, naming the trunk that would fit."""
        shapes = _tensor_shapes(self.weights.path)
        if self.strict:
            missing = trunk_mismatch(model, shapes)
            if missing:
                fits = plain_trunk_name(model)
                hint = f"; its trunk is timm's {fits}: checkpoint='{_default_name(fits)}'" if fits else ''
                raise ValueError(
                    f'trunk weights {self.checkpoint!r} do not fit {what}: {len(missing)} non-attention tensors would '
                    f'stay at init ({format_keys(missing)}){hint}; strict=False loads what fits')
        attention = sorted(k for k in shapes if _is_attention_key(k) and k in model.state_dict())
        if attention:
            print_log(f"TimmTrunk: {self.checkpoint!r} holds layer-attention weights ({format_keys(attention)}), "
                      f"which TimmTrunk keeps at init; init_cfg type 'Pretrained' loads them", logger='current',
                      level=logging.WARNING)

    def __call__(self, module: nn.Module) -> None:
        """mmengine's entry point (`initialize(module, dict(type='TimmTrunk', ...))`): check, then load."""
        self.check(module, what=type(module).__name__)
        self.load(module)

    def load(self, model: nn.Module) -> str:
        """Copy the trunk tensors into `model` (attention modules untouched); returns the summary line."""
        state_dict, _ = read_state_dict(self.weights.path)
        check_state_dict_values(state_dict, f'trunk weights {self.weights.path}')  # NaN / Inf: refused
        result = load_trunk(model, state_dict)
        if self.strict:  # `check` ran on the header; the data must agree with it
            left = [k for k in result.missing if not _is_attention_key(k) and not k.endswith('num_batches_tracked')]
            if left:
                raise ValueError(f'trunk weights {self.checkpoint!r} left {len(left)} non-attention tensors at init '
                                 f'({format_keys(left)})')
        summary = f'trunk from {self.weights.origin}: {result.summary()}'
        print_log(f'TimmTrunk: {summary}', logger='current')
        if hasattr(model, '_params_init_info'):
            from mmengine.model.weight_init import update_init_info
            update_init_info(model, init_info=f'TimmTrunk: {summary}')
        return summary
