"""Model cards of exported folders: dataset metadata, the card family of an architecture, and the rendering of
`README.md` (YAML front matter from `huggingface_hub.ModelCardData` + the family's template in `hub_cards/`).
"""
import dataclasses
import logging
import math
import re
import string
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch.nn as nn

from .._utils.errors import UserError
from ..families import families, find_family
from ..version import __version__

__all__ = ['CARD_TAGS', 'card_families', 'YOUR_ORG', 'resolve_dataset', 'model_family', 'card_template_path',
           'validate_metrics', 'render_model_card']

_logger = logging.getLogger(__name__)

CARD_TAGS = ['image-classification', 'timm', 'layer-attention', 'timm_layerattn']
# Placeholder org in the usage snippet of a card exported without a repo id; `push` fills in the real one.
YOUR_ORG = '<your-org>'

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
    """The card template (`hub_cards/<name>.md`) of one of this package's architectures, from the family
    registry (`UserError` for any other model)."""
    from .. import models  # noqa: F401  (registers every family)
    family = find_family(model_name)
    if family is None:
        arch = model_name.split('.', 1)[0]
        raise UserError(f"'{arch}' is not one of timm_layerattn's architectures; see `timm-layerattn list`")
    return family.card


def card_families() -> List[str]:
    """Every card template name a registered family uses."""
    from .. import models  # noqa: F401
    return sorted({f.card for f in families()})


def _card_dirs() -> List[Path]:
    """Where card templates live: inside the package (wheel installs) or the repository's `hub_cards/`."""
    package = Path(__file__).resolve().parent.parent  # timm_layerattn/ (this module is timm_layerattn/hub/card.py)
    return [package / 'hub_cards', package.parent / 'hub_cards']


def card_template_path(family: str) -> Path:
    """The template `hub_cards/<family>.md`, from the first of `_card_dirs()` that has it."""
    for d in _card_dirs():
        path = d / f'{family}.md'
        if path.is_file():
            return path
    raise FileNotFoundError(f'model card template {family}.md not found in ' + ' or '.join(map(str, _card_dirs())))


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------

def validate_metrics(metrics: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    """`metrics` as name -> float, refusing anything but finite numbers (they go into the card's model-index)."""
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


def _onnx_usage(repo_id: str, record: Mapping[str, Any], data_cfg: Mapping[str, Any], num_classes: int) -> str:
    """The card's ONNX section: how to run `model.onnx` with onnxruntime, and how it was exported and checked."""
    name = record.get('file', 'model.onnx')
    checked = ' and '.join('x'.join(map(str, c['shape'])) for c in record.get('checked', []))
    worst = max((c['max_rel_err'] for c in record.get('checked', [])), default=float('nan'))
    versions = record.get('versions', {})
    info = record.get('feature_info') or {}
    if record.get('features_only'):
        what = (f"the `features_only` backbone (timm `out_indices` {tuple(info.get('out_indices', ()))}): "
                f"outputs {', '.join(f'`{o}`' for o in record.get('outputs', []))}, feature maps with "
                f"{info.get('channels')} channels at strides {info.get('reductions')}")
        run = (f"features = session.run(None, {{'{record.get('input', 'input0')}': x}})  "
               f"# {len(record.get('outputs', []))} feature maps")
    else:
        what = f"the classifier: output `{(record.get('outputs') or ['output0'])[0]}`, logits [N, {num_classes}]"
        run = f"logits = session.run(None, {{'{record.get('input', 'input0')}': x}})[0]  # [1, {num_classes}]"
    return '\n'.join([
        '',
        '### ONNX',
        '',
        f"`{name}` is {what}. Opset {record.get('opset')}, exported with torch {versions.get('torch', '')} "
        f"(`torch.onnx.export(dynamo=True)`, the PyTorch path); input `{record.get('input', 'input0')}`, float32 "
        f"[batch, channels, height, width] with batch, height and width dynamic. Checked against the PyTorch "
        f"model in onnxruntime {versions.get('onnxruntime', '')} at {checked} (largest error {worst:.1g} "
        f"of the output's scale).",
        '',
        '```python',
        'import onnxruntime as ort  # pip install onnxruntime',
        'import timm',
        'from huggingface_hub import hf_hub_download',
        '',
        f"session = ort.InferenceSession(hf_hub_download('{repo_id}', '{name}'), providers=['CPUExecutionProvider'])",
        f'transform = timm.data.create_transform(**{dict(data_cfg)!r})  # the preprocessing used in training',
        '',
        '# img: a PIL image',
        'x = transform(img).unsqueeze(0).numpy()',
        run,
        '```',
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
        onnx: Optional[Mapping[str, Any]] = None,
) -> str:
    """README.md of an exported folder: YAML front matter from `ModelCardData` + the family template.

    Parameters and GMACs are measured here, on a meta-device copy of `model` at its configured input size.
    `onnx` is the record of the folder's `model.onnx` (`hub.onnx.OnnxExport.record()`): the card then says how
    to run it with onnxruntime.
    """
    from timm.models import split_model_name_tag
    from ..tools.zoo import count_macs, count_params
    arch = split_model_name_tag(model_name)[0]
    family = model_family(arch)
    pretrained_cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    metrics = validate_metrics(metrics)
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
        '| Weights | `model.safetensors`'
        + (f", `{onnx.get('file', 'model.onnx')}` (ONNX opset {onnx.get('opset')})" if onnx else '')
        + f', exported with timm_layerattn {__version__} |',
    ]
    usage = _usage(repo_id, num_classes, pretrained_cfg)
    if onnx:
        from timm.data import resolve_data_config
        usage += '\n' + _onnx_usage(repo_id, onnx, resolve_data_config({}, model=model), num_classes)
    values = dict(
        title=f'Model card for {full_name}',
        model_name=full_name,
        arch=arch,
        repo_id=repo_id,
        details='\n'.join(details),
        usage=usage,
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
