"""Pretrained-weight registration for this package's models, and the error raised when there are none.

No official weights exist for these architectures yet (every registry tag is `.untrained`), so
`pretrained=True` must say how to get weights instead of failing deep inside timm. Labs that publish
weights register them as a new `arch.tag` pretrained cfg; `pretrained=True` then loads them like any
timm weights (through `hf_hub_id`, `file` or `url`).

A checkpoint that cannot be used (missing, truncated, corrupt, not a state dict, NaN / Inf values, keys or
shapes that do not fit) raises a `CheckpointError` subclass naming the file and the problem
(`checkpoints.timm_entry` does the checking, for every entry point of timm; the error classes live in
`checkpoints.errors` and are re-exported here).
"""
import dataclasses
import logging
from typing import Any, Dict, Optional, Sequence, Tuple

from timm.models import PretrainedCfg, get_pretrained_cfg, is_model, split_model_name_tag
from timm.models import _registry

from .checkpoints.errors import (
    CheckpointError, CheckpointMismatchError, CheckpointNotCachedError, CheckpointNotFoundError,
    PretrainedWeightsError)

__all__ = ['PretrainedWeightsError', 'CheckpointError', 'CheckpointNotFoundError', 'CheckpointNotCachedError',
           'CheckpointMismatchError', 'no_weights_message', 'resolve_pretrained_source', 'check_pretrained_source',
           'register_pretrained', 'unregister_pretrained']

_logger = logging.getLogger(__name__)

# Fields that locate weights; one of them must be set for `pretrained=True` to load anything.
_SOURCE_FIELDS = ('hf_hub_id', 'file', 'url')


def no_weights_message(variant: str, tag: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    """The user-facing explanation of how to load weights into `variant` when its tag has none; `notes` (the
    pretrained cfg's) say where weights published off the Hub are."""
    name = f'{variant}.{tag}' if tag else variant
    where = ' '.join(notes) if notes else 'none have been published for this architecture yet'
    return (
        f"No pretrained weights exist for '{name}' in timm_layerattn's registry ({where}). Load weights with one of: "
        f"timm.create_model('hf-hub:<org>/<repo>', pretrained=True) for an exported Hub repo; "
        f"timm.create_model('local-dir:/path/to/exported_folder', pretrained=True) for a folder written by "
        f"`timm-layerattn export`; "
        f"timm.create_model('{variant}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(file='/path/to/model.safetensors')) for a single checkpoint file; "
        f"or register published weights once with "
        f"timm_layerattn.register_pretrained('{variant}.<tag>', hf_hub_id='<org>/<repo>'). "
        f"To start from timm ResNet weights instead, create the model with pretrained=False and call "
        f"timm_layerattn.load_trunk(model, 'resnet50.a1_in1k')."
    )


def resolve_pretrained_source(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> Tuple[str, Any, Dict[str, Any]]:
    """Where `build_model_with_cfg` will load weights from: `(load_from, location, cfg dict)`.

    Resolves the cfg exactly as timm will (tag string, dict or registry default, plus overlay); `load_from`
    is timm's source kind ('file', 'local-dir', 'hf-hub', 'url', 'state_dict') or '' when there is none.
    """
    from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
    from timm.models._pretrained import filter_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    # `cfg.to_dict()` (dataclasses.asdict) would deep-copy a `state_dict` source's tensors: read the fields instead
    cfg_dict = filter_pretrained_cfg({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    load_from, location = _resolve_pretrained_source(cfg_dict)
    return load_from, location, cfg_dict


def check_pretrained_source(
        variant: str,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
) -> Tuple[str, Any, Dict[str, Any]]:
    """Raise `PretrainedWeightsError` if the resolved pretrained cfg has nowhere to load weights from.

    A `local-dir:` / `hf-hub:` source, an overlay `file` or a registered tag all pass. Returns what
    `resolve_pretrained_source` does.
    """
    load_from, location, cfg = resolve_pretrained_source(variant, pretrained_cfg, pretrained_cfg_overlay)
    if not load_from:
        raise PretrainedWeightsError(no_weights_message(variant, cfg.get('tag'), tuple(cfg.get('notes') or ())))
    return load_from, location, cfg


def _validate_hub_id(hf_hub_id: str) -> None:
    repo_id = hf_hub_id.split('@', 1)[0]
    parts = repo_id.split('/')
    if len(parts) != 2 or not all(parts) or hf_hub_id.count('@') > 1:
        raise ValueError(
            f"hf_hub_id must be a full '<org>/<repo>' id, optionally with '@<revision>', got {hf_hub_id!r} "
            f"(only timm's own 'timm/' prefix is auto-completed, and not for plugins)")


def register_pretrained(
        name: str,
        *,
        hf_hub_id: Optional[str] = None,
        file: Optional[str] = None,
        url: Optional[str] = None,
        default: Optional[bool] = None,
        **cfg_fields: Any,
) -> PretrainedCfg:
    """Register weights for an existing architecture under a new (or replaced) pretrained tag.

    The new cfg starts from the architecture's weightless default cfg (input size, mean/std, classifier,
    ...) with `cfg_fields` applied on top, so only what differs needs stating (e.g. `num_classes=100`).

    Args:
        name: `'<arch>.<tag>'`, e.g. `'resnet50_kcla.mylab_in1k'`. The architecture must be registered.
        hf_hub_id: Full Hub repo id (`'<org>/<repo>'`, optionally `'@<revision>'`).
        file: Local weight file (safetensors or a torch state dict).
        url: Download URL of a torch state dict.
        default: Make this tag the architecture's default, i.e. what `pretrained=True` on the bare
            architecture name loads. `None`: only if the current default has no weights.
        **cfg_fields: Other `PretrainedCfg` fields (`num_classes`, `label_names`, `mean`, `license`, ...).

    Returns:
        The registered cfg.
    """
    arch, tag = split_model_name_tag(name)
    if not tag:
        raise ValueError(f"register_pretrained needs '<arch>.<tag>', got {name!r}")
    if not is_model(arch):
        raise ValueError(f'Unknown architecture {arch!r}: import the module that registers it first')
    if sum(v is not None for v in (hf_hub_id, file, url)) != 1:
        raise ValueError('register_pretrained needs exactly one of hf_hub_id=, file= or url=')
    if hf_hub_id is not None:
        _validate_hub_id(hf_hub_id)
    unknown = set(cfg_fields) - {f.name for f in dataclasses.fields(PretrainedCfg)}
    reserved = set(cfg_fields) & {'architecture', 'tag', 'source', 'state_dict', 'hf_hub_filename'}
    if unknown or reserved:
        raise ValueError(f'register_pretrained: unsupported fields {sorted(unknown | reserved)}')

    default_cfg = _registry._model_default_cfgs.get(arch)
    # Start from the architecture's weightless cfg (its `.untrained` tag), so fields of another lab's tag
    # (labels, hub id, ...) never leak into this one.
    base = None
    if default_cfg is not None:
        base = next((c for c in default_cfg.cfgs.values() if not c.has_weights), None)
    base = base or get_pretrained_cfg(arch) or PretrainedCfg()
    cfg = dataclasses.replace(
        base, url=url, file=file, hf_hub_id=hf_hub_id, hf_hub_filename=None, source=None, state_dict=None,
        custom_load=False, architecture=arch, tag=tag, **cfg_fields)

    if default_cfg is None:
        default_cfg = _registry.DefaultCfg()
        _registry._model_default_cfgs[arch] = default_cfg
    replaced = tag in default_cfg.cfgs
    if replaced:
        default_cfg.tags.remove(tag)
    current_default = default_cfg.cfgs[default_cfg.tags[0]] if default_cfg.tags else None
    if default is None:
        default = current_default is None or not current_default.has_weights
    if default:
        default_cfg.tags.appendleft(tag)
    else:
        default_cfg.tags.append(tag)
    default_cfg.cfgs[tag] = cfg
    default_cfg.is_pretrained = True
    _sync_registry(arch)
    _logger.info(f"Registered pretrained weights '{arch}.{tag}'{' (default)' if default else ''}")
    return cfg


def unregister_pretrained(name: str) -> None:
    """Remove a tag added by `register_pretrained`; the remaining first tag becomes the default again."""
    arch, tag = split_model_name_tag(name)
    default_cfg = _registry._model_default_cfgs.get(arch)
    if default_cfg is None or tag not in default_cfg.cfgs:
        raise ValueError(f'{name!r} is not a registered pretrained tag')
    if len(default_cfg.cfgs) == 1:
        raise ValueError(f"refusing to remove the only pretrained cfg of '{arch}'")
    default_cfg.tags.remove(tag)
    del default_cfg.cfgs[tag]
    _registry._model_pretrained_cfgs.pop(f'{arch}.{tag}', None)
    _registry._model_has_pretrained.discard(f'{arch}.{tag}')
    default_cfg.is_pretrained = any(c.has_weights for c in default_cfg.cfgs.values())
    _sync_registry(arch)


def _sync_registry(arch: str) -> None:
    """Rebuild timm's per-tag tables for `arch` from its `DefaultCfg`, as `register_model` does."""
    default_cfg = _registry._model_default_cfgs[arch]
    with_tags = []
    for idx, tag in enumerate(default_cfg.tags):
        cfg = dataclasses.replace(default_cfg.cfgs[tag], architecture=arch, tag=tag or None)
        full_name = f'{arch}.{tag}' if tag else arch
        if idx == 0:
            _registry._model_pretrained_cfgs[arch] = cfg
            if cfg.has_weights:
                _registry._model_has_pretrained.add(arch)
            else:
                _registry._model_has_pretrained.discard(arch)
        if tag:
            _registry._model_pretrained_cfgs[full_name] = cfg
            if cfg.has_weights:
                _registry._model_has_pretrained.add(full_name)
            else:
                _registry._model_has_pretrained.discard(full_name)
        with_tags.append(full_name)
    _registry._model_with_tags[arch] = with_tags
