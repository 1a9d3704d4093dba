"""Weights to the Hugging Face Hub: export a Hub-ready folder, render its model card, push it.

A folder holds exactly what timm loads (`conventions.md` §3): `model.safetensors` (the plain state dict),
`config.json` in timm's format (written by `timm.models.save_for_hf`) and `README.md`, a model card
rendered from the family's template in `hub_cards/`. Every export is written to a temporary sibling
folder, reloaded through `timm.create_model('local-dir:...', pretrained=True)` and compared bit for bit
with the source model before it is renamed into place, so a folder that exists is a folder that loads.

Pushing uses `huggingface_hub` (`create_repo` + `upload_folder`); it is imported only when used.
"""
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._utils import MARKER_KEY, UserError, atomic_dir, check_output_dir, first_line, output_marker, read_marker
from .version import __version__

__all__ = ['export_folder', 'is_export_folder', 'check_export_dir', 'load_model_from_checkpoint', 'render_model_card',
           'model_family', 'validate_folder',
           'push_folder', 'PushResult', 'card_template_path', 'CARD_FAMILIES', 'HUB_FILES']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# The files a Hub repo of ours holds; nothing else is uploaded.
HUB_FILES = ('config.json', 'model.safetensors', 'README.md')
CARD_TAGS = ['image-classification', 'timm', 'layer-attention', 'timm_layerattn']
# Placeholder org in the usage snippet of a card exported without a repo id; `push` fills in the real one.
YOUR_ORG = '<your-org>'

# Model name patterns -> card family (the template `hub_cards/<family>.md`). First match wins.
CARD_FAMILIES: Tuple[Tuple[str, str], ...] = (
    (r'_kcla$', 'kcla'),
    (r'_mrlal$', 'mrla_l'),
    (r'_mrlab$', 'mrla_b'),
    (r'_gradattn_', 'gradattn'),
    (r'^cifar_resnet20_basic(_(selfatt|mha|cbam))?$', 'cnntention'),
    (r'_as_(out|kv|stages)$|^(cifar_)?resnet50_(half|plain)$|^cifar_resnet50$', 'attention_shortcuts'),
    (r'^cifar_resnet\d+$', 'cifar_resnet'),
)


@dataclasses.dataclass(frozen=True)
class _Dataset:
    hub_id: str  # Hub dataset id for the card's `datasets:` and model-index
    name: str  # human name
    split: str  # evaluation split the metrics refer to
    tag: str  # default pretrained tag suffix


_DATASETS = {
    'cifar10': _Dataset('uoft-cs/cifar10', 'CIFAR-10', 'test', 'cifar10'),
    'cifar100': _Dataset('uoft-cs/cifar100', 'CIFAR-100', 'test', 'cifar100'),
    'imagenet-1k': _Dataset('imagenet-1k', 'ImageNet-1k', 'validation', 'in1k'),
    'mnist': _Dataset('ylecun/mnist', 'MNIST', 'test', 'mnist'),
    'fashion_mnist': _Dataset('zalando-datasets/fashion_mnist', 'Fashion-MNIST', 'test', 'fashion_mnist'),
}
_DATASET_ALIASES = {
    'cifar-10': 'cifar10', 'torch/cifar10': 'cifar10', 'uoft-cs/cifar10': 'cifar10', 'hfds/uoft-cs/cifar10': 'cifar10',
    'cifar-100': 'cifar100', 'torch/cifar100': 'cifar100', 'uoft-cs/cifar100': 'cifar100',
    'hfds/uoft-cs/cifar100': 'cifar100',
    'in1k': 'imagenet-1k', 'imagenet': 'imagenet-1k', 'imagenet1k': 'imagenet-1k', 'ilsvrc2012': 'imagenet-1k',
    'torch/mnist': 'mnist', 'ylecun/mnist': 'mnist',
    'torch/fashion_mnist': 'fashion_mnist', 'fashion-mnist': 'fashion_mnist',
}

# Metric names accepted in `metrics` -> (model-index metric type, display name)
_METRIC_NAMES = {
    'top1': ('accuracy', 'Top-1 accuracy'), 'acc1': ('accuracy', 'Top-1 accuracy'),
    'accuracy': ('accuracy', 'Top-1 accuracy'), 'top1_acc': ('accuracy', 'Top-1 accuracy'),
    'top5': ('accuracy', 'Top-5 accuracy'), 'acc5': ('accuracy', 'Top-5 accuracy'),
    'top5_acc': ('accuracy', 'Top-5 accuracy'),
    'top1_err': ('error', 'Top-1 error'), 'error': ('error', 'Top-1 error'),
    'loss': ('loss', 'Loss'),
}

_TAG_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_\-]*$')


def resolve_dataset(dataset: Optional[str]) -> Optional[_Dataset]:
    """Known dataset names (and their timm / Hub spellings) -> card metadata; other names pass through."""
    if not dataset:
        return None
    key = dataset.strip().lower()
    key = _DATASET_ALIASES.get(key, key)
    if key in _DATASETS:
        return _DATASETS[key]
    tag = re.sub(r'[^A-Za-z0-9_]+', '_', dataset.split('/')[-1]).strip('_').lower() or 'custom'
    return _Dataset(dataset, dataset, 'test', tag)


def model_family(model_name: str) -> str:
    """The card family of one of this package's architectures (`UserError` for anything else)."""
    from timm.models import split_model_name_tag
    arch = split_model_name_tag(model_name)[0]
    for pattern, family in CARD_FAMILIES:
        if re.search(pattern, arch):
            return family
    raise UserError(f"'{arch}' is not one of timm_layerattn's architectures; see `timm-layerattn list`")


def _card_dirs() -> List[Path]:
    """Where card templates live: inside the package (wheel installs) or the repository's `hub_cards/`."""
    here = Path(__file__).resolve().parent
    return [here / 'hub_cards', here.parent / 'hub_cards']


def card_template_path(family: str) -> Path:
    for d in _card_dirs():
        path = d / f'{family}.md'
        if path.is_file():
            return path
    raise FileNotFoundError(f'model card template {family}.md not found in ' + ' or '.join(map(str, _card_dirs())))


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------

def _validate_metrics(metrics: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise UserError(f'metrics must be a JSON object of name -> number, got {type(metrics).__name__}')
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f'metric {k!r} must be a finite number, got {v!r}')
        out[str(k)] = float(v)
    return out


def _fmt_count(n: int) -> str:
    return f'{n / 1e6:.3f} M ({n:,})'


def _model_summary(model: nn.Module) -> str:
    """Short architecture description from the model's config (ResNetLA) or class name."""
    cfg = getattr(model, 'cfg', None)
    parts = [type(model).__name__]
    if cfg is not None and hasattr(cfg, 'layers'):
        parts.append(f'{getattr(cfg, "block", "")} blocks {"-".join(map(str, cfg.layers))}'.strip())
        stem = getattr(cfg, 'stem_type', '') or '7x7'
        parts.append(f'{stem} stem')
        attn = getattr(cfg, 'attn', None)
        if attn is not None:
            parts.append(f'{attn.type} head dim {attn.head_dim}')
    return ', '.join(parts)


def _usage(repo_id: str, num_classes: int, pretrained_cfg: Mapping[str, Any]) -> str:
    size = 'x'.join(str(s) for s in pretrained_cfg.get('input_size', (3, 224, 224))[1:])
    return '\n'.join([
        '```python',
        'import timm, timm_layerattn  # importing timm_layerattn registers the architecture with timm',
        'import torch',
        '',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()",
        'data_cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**data_cfg)  # ' + f'{size} px, the normalisation used in training',
        '',
        '# img: a PIL image',
        'with torch.no_grad():',
        f'    probs = model(transform(img).unsqueeze(0)).softmax(-1)  # [1, {num_classes}]',
        '```',
        '',
        'Fine-tune on another label set, or take multi-scale features:',
        '',
        '```python',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True, num_classes=NUM_CLASSES)",
        f"backbone = timm.create_model('hf-hub:{repo_id}', pretrained=True, features_only=True)",
        '```',
        '',
        'Command line (no Python): `pip install timm-layerattn`, then any timm script that imports '
        '`timm_layerattn` first (e.g. `train.py --device-modules timm_layerattn --model hf-hub:' + repo_id
        + ' --pretrained`).',
    ])


def _results_table(metrics: Dict[str, float], ds: Optional[_Dataset]) -> str:
    if not metrics:
        return 'No evaluation results were given when this folder was exported.'
    where = f'{ds.name} {ds.split}' if ds is not None else 'evaluation set not recorded'
    lines = ['| dataset / split | metric | value |', '|---|---|---:|']
    for k, v in metrics.items():
        name = _METRIC_NAMES.get(k.lower(), (k, k))[1]
        lines.append(f'| {where} | {name} | {v:g} |')
    return '\n'.join(lines)


def _card_data(
        model_name: str,
        license: Optional[str],
        ds: Optional[_Dataset],
        metrics: Dict[str, float],
) -> Any:
    from huggingface_hub import EvalResult, ModelCardData
    eval_results = None
    if metrics and ds is not None:
        eval_results = []
        for k, v in metrics.items():
            metric_type, metric_name = _METRIC_NAMES.get(k.lower(), (k, k))
            eval_results.append(EvalResult(
                task_type='image-classification', dataset_type=ds.hub_id, dataset_name=ds.name,
                dataset_split=ds.split, metric_type=metric_type, metric_value=v, metric_name=metric_name))
    metric_types = sorted({_METRIC_NAMES.get(k.lower(), (k, k))[0] for k in metrics}) or None
    return ModelCardData(
        library_name='timm',
        license=license,
        tags=list(CARD_TAGS),
        datasets=[ds.hub_id] if ds is not None else None,
        metrics=metric_types,
        pipeline_tag='image-classification',
        model_name=model_name,
        eval_results=eval_results,
    )


def render_model_card(
        model: nn.Module,
        *,
        model_name: str,
        tag: Optional[str] = None,
        dataset: Optional[str] = None,
        metrics: Optional[Mapping[str, Any]] = None,
        recipe: Optional[str] = None,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
) -> str:
    """README.md of an exported folder: YAML front matter from `ModelCardData` + the family template.

    Parameters and GMACs are measured here, on a meta-device copy of `model` at its configured input size.
    """
    from timm.models import split_model_name_tag
    from .tools.zoo import count_macs, count_params
    arch = split_model_name_tag(model_name)[0]
    family = model_family(arch)
    pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    metrics = _validate_metrics(metrics)
    ds = resolve_dataset(dataset)
    full_name = f'{arch}.{tag}' if tag else arch
    repo_id = repo_id or f'{YOUR_ORG}/{full_name}'
    license = license or pretrained_cfg.get('license') or 'other'

    in_chans = getattr(model, 'in_chans', None) or pretrained_cfg.get('input_size', (3,))[0]
    input_size = (in_chans, *tuple(pretrained_cfg.get('input_size', (3, 224, 224)))[1:])
    num_classes = getattr(model, 'num_classes', pretrained_cfg.get('num_classes', 0))
    params = count_params(model)
    meta = _meta_copy(model)
    gmacs = count_macs(meta, input_size) / 1e9 if meta is not None else float('nan')

    size = 'x'.join(map(str, input_size))
    details = [
        '| | |', '|---|---|',
        f'| Model | `{full_name}` |',
        f'| Architecture | {_model_summary(model)} |',
        f'| Parameters | {_fmt_count(params)} |',
        f'| GMACs | {gmacs:.3f} at {size} (multiply-accumulates, the papers\' "FLOPs") |',
        f'| Input | {size}, mean {tuple(pretrained_cfg.get("mean", ()))}, std {tuple(pretrained_cfg.get("std", ()))}, '
        f'crop_pct {pretrained_cfg.get("crop_pct", "")}, {pretrained_cfg.get("interpolation", "")} |',
        f'| Classes | {num_classes} |',
        f'| Dataset | {f"{ds.name} (`{ds.hub_id}`)" if ds else "not recorded"} |',
        f'| License | {license} |',
        f'| Weights | `model.safetensors`, exported with timm_layerattn {__version__} |',
    ]
    values = dict(
        title=f'Model card for {full_name}',
        model_name=full_name,
        arch=arch,
        repo_id=repo_id,
        details='\n'.join(details),
        usage=_usage(repo_id, num_classes, pretrained_cfg),
        recipe=(recipe or '').strip() or 'The training recipe was not recorded when this folder was exported.',
        results=_results_table(metrics, ds),
    )
    template = string.Template(card_template_path(family).read_text(encoding='utf-8'))
    try:
        body = template.substitute(values)
    except (KeyError, ValueError) as e:
        raise RuntimeError(f'model card template {family}.md is malformed: {e!r}') from e
    card_data = _card_data(full_name, license, ds, metrics)
    return f'---\n{card_data.to_yaml()}\n---\n\n{body.strip()}\n'


def _meta_copy(model: nn.Module) -> Optional[nn.Module]:
    """A weightless rebuild of `model` on the meta device (for MAC counting without compute or memory)."""
    import timm
    from timm.models._input import get_model_args
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    try:
        return timm.create_model(arch, device='meta', **get_model_args(model, {}))
    except Exception as e:  # counting is informative only
        _logger.warning(f'could not count MACs of {arch}: {e}')
        return None


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

def _check_label_names(label_names: Optional[Sequence[str]], num_classes: int) -> Optional[List[str]]:
    if label_names is None:
        return None
    if isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence):
        raise UserError('label_names must be a list of class names')
    names = [str(n) for n in label_names]
    if len(names) != num_classes:
        raise UserError(f'{len(names)} label names given for a model with {num_classes} classes')
    return names


def _verify_export(model: nn.Module, folder: Path) -> None:
    """Reload `folder` through timm's `local-dir:` path and require bit-identical weights and logits."""
    import timm
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None else torch.float32
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).to(device=device, dtype=dtype).eval()
    src_sd, new_sd = model.state_dict(), reloaded.state_dict()
    if src_sd.keys() != new_sd.keys():
        diff = sorted(set(src_sd) ^ set(new_sd))
        raise UserError(f'export check failed: the reloaded model has different keys ({", ".join(diff[:5])})')
    for k, v in src_sd.items():
        if not torch.equal(v, new_sd[k].to(v.dtype)):
            raise UserError(f'export check failed: {k} differs after reloading the exported folder')
    input_size = reloaded.pretrained_cfg.get('input_size', (3, 224, 224))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, model.in_chans if hasattr(model, 'in_chans') else input_size[0], *input_size[1:]),
                    generator=gen).to(device=device, dtype=dtype)
    try:
        model.eval()
        with torch.no_grad():
            same = torch.equal(model(x), reloaded(x))
    finally:
        model.train(was_training)
    if not same:
        raise UserError('export check failed: the reloaded model gives different outputs')


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / EMA (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    for _ in range(4):
        inner = getattr(model, '_orig_mod', None) or getattr(model, 'module', None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


EXPORT_KIND = 'an export folder of timm_layerattn (config.json with its marker, nothing else)'


def is_export_folder(folder: PathLike) -> bool:
    """Whether `folder` is an export of ours that `--overwrite` may replace: its config.json carries the
    package's marker entry and it holds nothing but the exported files (so replacing it loses nothing else)."""
    folder = Path(folder)
    try:
        return read_marker(folder / 'config.json') is not None and all(p.name in HUB_FILES for p in folder.iterdir())
    except OSError:
        return False


def check_export_dir(out_dir: PathLike, overwrite: bool = False, what: str = 'output folder') -> None:
    """Raise `UserError` unless `export_folder(..., out_dir, overwrite=overwrite)` may write `out_dir`.

    For early checks, before the work that precedes an export (loading, training).
    """
    check_output_dir(out_dir, overwrite, is_ours=is_export_folder, kind=EXPORT_KIND, what=what)


def export_folder(
        model: nn.Module,
        out_dir: PathLike,
        *,
        model_name: str,
        tag: Optional[str] = None,
        dataset: Optional[str] = None,
        metrics: Optional[dict] = None,
        label_names: Optional[list] = None,
        recipe: Optional[str] = None,
        overwrite: bool = False,
        repo_id: Optional[str] = None,
        license: Optional[str] = None,
        verify: bool = True,
) -> Path:
    """Write a Hub-ready folder (`model.safetensors`, `config.json`, `README.md`) for `model`.

    Args:
        model: A model built by `timm.create_model` (it carries the `pretrained_cfg` that `config.json` records);
            DDP, EMA and `torch.compile` wrappers are looked through.
        out_dir: Destination folder; written atomically (nothing is left behind on error).
        model_name: Architecture name, optionally with a tag (`'cifar_resnet20_kcla.cifar10'`).
        tag: Pretrained tag the weights are published under (default: from `model_name`, else the dataset).
        dataset: Training dataset (`cifar10`, `cifar100`, `imagenet-1k`, or a Hub dataset id).
        metrics: Evaluation results, e.g. `{'top1': 91.2, 'top5': 99.7}`; they go into the card's model-index.
        label_names: Class names, one per output.
        recipe: Training recipe (markdown) for the card.
        overwrite: Replace an existing `out_dir`, if it is an earlier export (see `is_export_folder`); another
            folder or a file is never replaced.
        repo_id: The Hub repo the folder is meant for (used in the card's usage snippet).
        license: Licence of the weights (default: the registry cfg's).
        verify: Reload the folder through `local-dir:` and require bit-identical weights and outputs.

    Returns:
        The folder path.
    """
    from timm.models import is_model, save_for_hf, split_model_name_tag
    model = _unwrap(model)
    arch, name_tag = split_model_name_tag(model_name)
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    model_family(arch)
    pretrained_cfg = getattr(model, 'pretrained_cfg', None)
    if not pretrained_cfg:
        raise UserError('the model has no pretrained_cfg; build it with timm.create_model(...)')
    if pretrained_cfg.get('architecture') not in (None, arch):
        raise UserError(f"model_name '{arch}' does not match the model, a '{pretrained_cfg['architecture']}'")
    ds = resolve_dataset(dataset)
    tag = tag or name_tag or (ds.tag if ds is not None else None)
    if tag is not None and not _TAG_RE.match(tag):
        raise UserError(f'invalid tag {tag!r}: use letters, digits, "_" and "-" (e.g. "mylab_cifar10")')
    metrics = _validate_metrics(metrics)
    num_classes = getattr(model, 'num_classes', pretrained_cfg.get('num_classes', 0))
    label_names = _check_label_names(label_names, num_classes)
    if repo_id is not None:
        _check_repo_id(repo_id)
    license = license or pretrained_cfg.get('license')
    from .convert import check_finite
    check_finite(model.state_dict(), f'the model ({arch})')

    cfg_overrides: Dict[str, Any] = {'tag': tag, 'license': license}
    model_config: Dict[str, Any] = {'pretrained_cfg': cfg_overrides}
    if label_names:
        model_config['label_names'] = label_names
    card = render_model_card(
        model, model_name=arch, tag=tag, dataset=dataset, metrics=metrics, recipe=recipe, repo_id=repo_id,
        license=license)
    with atomic_dir(out_dir, overwrite=overwrite, is_ours=is_export_folder, kind=EXPORT_KIND) as tmp:
        try:
            save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        except ValueError as e:
            raise UserError(f'cannot export the model config: {e}') from None
        config_path = tmp / 'config.json'
        config = json.loads(config_path.read_text())
        config['pretrained_cfg'] = {k: v for k, v in config['pretrained_cfg'].items() if v is not None}
        config[MARKER_KEY] = output_marker('export', family=model_family(arch))
        config_path.write_text(json.dumps(config, indent=2) + '\n')
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        if verify:
            _verify_export(model, tmp)
    _logger.info(f'exported {arch} to {out_dir}')
    return Path(out_dir)


def load_model_from_checkpoint(
        model_name: str,
        checkpoint: PathLike,
        *,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        prefer_ema: bool = True,
        **model_kwargs: Any,
) -> Tuple[nn.Module, str]:
    """Build `model_name` and load a checkpoint file into it strictly.

    Accepts this package's layout (timm training checkpoints, `model.state_dict()` files, safetensors)
    and the official KCLA / MRLA / CNNtention layouts (converted with `convert_official`). `num_classes`
    and `in_chans` default to the checkpoint's classifier and stem shapes.

    Returns:
        The model (eval mode) and a one-line description of what was loaded.
    """
    import timm
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag
    from .convert import (
        check_finite, check_state_dict, convert_official, detect_official_family, infer_kcla_head_dim, read_state_dict)
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UserError(f"unknown model '{arch}'; see `timm-layerattn list`")
    model_family(arch)
    state_dict, container = read_state_dict(checkpoint, prefer_ema=prefer_ema)
    note = f"'{container}' of {checkpoint}" if container else str(checkpoint)
    check_finite(state_dict, f'checkpoint {checkpoint}' + (f" ('{container}')" if container else ''))
    head_dim = infer_kcla_head_dim(state_dict)
    if head_dim is not None and 'head_dim' not in model_kwargs and model_family(arch) == 'kcla':
        default = getattr(timm.create_model(arch, device='meta').cfg.attn, 'head_dim', None)
        if head_dim != default:  # e.g. the released ImageNet KCLA code's 64; only recorded when not the default
            model_kwargs['head_dim'] = head_dim
            note += f' (KCLA head_dim {head_dim}, read from norm_d)'
    if detect_official_family(state_dict) is not None:
        state_dict = convert_official(state_dict, arch, head_dim=model_kwargs.get('head_dim'))
        note += ' (official layout, converted)'
    cfg = get_pretrained_cfg(model_name) or get_pretrained_cfg(arch)
    classifier = getattr(cfg, 'classifier', None) or 'fc'
    first_conv = getattr(cfg, 'first_conv', None) or 'conv1'
    fc_w = state_dict.get(f'{classifier}.weight')
    if num_classes is None and fc_w is not None and fc_w.ndim == 2:
        num_classes = fc_w.shape[0]
    stem_w = state_dict.get(f'{first_conv}.weight')
    if in_chans is None and stem_w is not None and stem_w.ndim == 4:
        in_chans = stem_w.shape[1]
    kwargs = {k: v for k, v in dict(model_kwargs, num_classes=num_classes, in_chans=in_chans).items() if v is not None}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError) as e:  # the constructors' checks of their arguments
        raise UserError(f'cannot build {arch} with {kwargs}: {e}') from None
    check_state_dict(state_dict, model.state_dict(), what=f"'{arch}'")
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), note


# ---------------------------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------------------------

def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r'[A-Za-z0-9][\w.\-]*/[\w.\-]+', repo_id or '') or '..' in repo_id:
        raise UserError(f"invalid repo id {repo_id!r}: expected '<org-or-user>/<name>'")


@dataclasses.dataclass
class _FolderInfo:
    folder: Path
    architecture: str
    tag: Optional[str]
    num_classes: int
    files: Dict[str, int]  # name -> size in bytes
    ignored: List[str]
    num_params: int


def validate_folder(folder: PathLike) -> _FolderInfo:
    """Check that `folder` is a loadable export: the three files, a registered architecture, strict reload."""
    import timm
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f'not a folder: {folder}')
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f'{folder} is missing {", ".join(missing)}; create it with `timm-layerattn export`')
    try:
        config = json.loads((folder / 'config.json').read_text())
        arch = config['architecture']
    except (ValueError, KeyError) as e:
        raise UserError(f'{folder / "config.json"} is not a timm config ({type(e).__name__}: {e})') from None
    if not timm.is_model(arch):
        raise UserError(f"config.json names an unknown architecture '{arch}'")
    readme = (folder / 'README.md').read_text(encoding='utf-8')
    if not readme.startswith('---') or 'library_name: timm' not in readme.split('---', 2)[1]:
        raise UserError(f'{folder / "README.md"} has no model card front matter with library_name: timm')
    try:
        model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    except Exception as e:
        raise UserError(f'{folder} does not load through local-dir: ({type(e).__name__}: '
                        f'{str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    from .tools.zoo import count_params
    return _FolderInfo(
        folder=folder,
        architecture=arch,
        tag=config.get('pretrained_cfg', {}).get('tag'),
        num_classes=config.get('num_classes', 0),
        files={f: (folder / f).stat().st_size for f in HUB_FILES},
        ignored=sorted(p.name for p in folder.iterdir() if p.name not in HUB_FILES),
        num_params=count_params(model),
    )


@dataclasses.dataclass
class PushResult:
    repo_id: str
    revision: str
    files: List[str]
    dry_run: bool
    commit_oid: Optional[str] = None
    commit_url: Optional[str] = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _stage(info: _FolderInfo, repo_id: str, staging: Path) -> None:
    """Copy the three files to `staging`, pointing the card's placeholder repo id at the real one."""
    for name in HUB_FILES:
        src, dst = info.folder / name, staging / name
        if name == 'README.md':
            text = src.read_text(encoding='utf-8')
            text = re.sub(re.escape(YOUR_ORG) + r'/[\w.\-]+', repo_id, text)
            dst.write_text(text, encoding='utf-8')
        else:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def push_folder(
        folder: PathLike,
        repo_id: str,
        *,
        private: bool = False,
        revision: Optional[str] = None,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        token: Optional[str] = None,
        print_fn=print,
) -> PushResult:
    """Upload an exported folder to a Hub model repo (`create_repo` + `upload_folder`).

    The folder is validated first (see `validate_folder`). Only `config.json`, `model.safetensors` and
    `README.md` are uploaded. With `dry_run`, nothing is sent: the plan is printed and returned.
    """
    _check_repo_id(repo_id)
    info = validate_folder(folder)
    revision_name = revision or 'main'
    from huggingface_hub import get_token
    token = token or get_token()
    if not token and not dry_run:
        raise UserError('no Hugging Face token found: set HF_TOKEN or run `hf auth login` (see --dry-run to check '
                        'the folder without one)')
    where = f'{repo_id} ({"private" if private else "public"} model repo, revision {revision_name}'
    where += ', as a pull request)' if create_pr else ')'
    print_fn(f'{"would upload" if dry_run else "uploading"} {info.folder} -> {where}')
    for name, size in info.files.items():
        print_fn(f'  {name:<18} {size:>12,d} bytes  sha256 {_sha256(info.folder / name)[:16]}')
    if info.ignored:
        print_fn(f'  not uploaded: {", ".join(info.ignored)}')
    print_fn(f"  checked: loads as '{info.architecture}' through local-dir: ({info.num_params:,} params, "
             f'{info.num_classes} classes)')
    files = list(HUB_FILES)
    if dry_run:
        print_fn(f'  token: {"found" if token else "NOT found (set HF_TOKEN or run `hf auth login` before pushing)"}')
        return PushResult(repo_id=repo_id, revision=revision_name, files=files, dry_run=True)

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token, library_name='timm_layerattn', library_version=__version__)
    message = commit_message or f'Upload {info.architecture}{"." + info.tag if info.tag else ""} (timm_layerattn)'
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        repo_id = getattr(url, 'repo_id', None) or repo_id
        if revision and revision != 'main' and not create_pr and not revision.startswith('refs/') \
                and not re.fullmatch(r'[0-9a-f]{40}', revision):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix='timm_layerattn_push_') as staging:
            _stage(info, repo_id, Path(staging))
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staging, repo_type='model', revision=revision,
                commit_message=message, allow_patterns=files, create_pr=create_pr)
    except HfHubHTTPError as e:
        raise UserError(f'push to {repo_id} failed: {first_line(e)}') from None
    except OSError as e:  # network errors (connection refused, DNS, timeouts)
        raise UserError(f'push to {repo_id} failed, the Hub could not be reached: {first_line(e)}') from None
    except Exception as e:
        if type(e).__module__.startswith(('httpx', 'httpcore')):
            raise UserError(f'push to {repo_id} failed, the Hub could not be reached: {first_line(e)}') from None
        raise
    oid = getattr(commit, 'oid', None)
    print_fn(f'pushed: commit {oid}')
    print_fn(f"load it with: timm.create_model('hf-hub:{repo_id}@{oid}', pretrained=True)  (after import "
             f'timm_layerattn)')
    return PushResult(repo_id=repo_id, revision=revision_name, files=files, dry_run=False, commit_oid=oid,
                      commit_url=getattr(commit, 'commit_url', None))
