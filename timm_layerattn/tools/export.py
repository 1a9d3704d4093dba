"""`timm-layerattn export`: a training checkpoint -> a Hub-ready folder (weights, config.json, model card), with
`--onnx` also an ONNX graph checked against onnxruntime."""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ['add_arguments', 'run']


def _json_arg(value: Optional[str], what: str) -> Any:
    """A JSON literal, or `@file.json` / a path to a JSON file."""
    from .._utils.errors import UserError
    if value is None:
        return None
    text = value
    path = Path(value[1:] if value.startswith('@') else value)
    if value.startswith('@') or (not value.lstrip().startswith(('{', '[')) and path.is_file()):
        if not path.is_file():
            raise UserError(f'{what} file not found: {path}')
        text = path.read_text(encoding='utf-8')
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f'{what} is not valid JSON ({e})') from None


def _label_names(value: Optional[str]) -> Optional[List[str]]:
    """JSON list, or a text file with one class name per line."""
    from .._utils.errors import UserError
    if value is None:
        return None
    path = Path(value[1:] if value.startswith('@') else value)
    if path.is_file() and path.suffix != '.json':
        return [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    names = _json_arg(value, '--label-names')
    if isinstance(names, dict):  # {"0": "cat", ...}
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except ValueError:
            raise UserError('--label-names as an object must map class indices to names') from None
    if not isinstance(names, list):
        raise UserError('--label-names must be a JSON list of class names or a text file, one name per line')
    return names


def _model_kwargs(items: List[str]) -> Dict[str, Any]:
    import ast
    from .._utils.errors import UserError
    out = {}
    for item in items or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UserError(f'--model-kwargs takes key=value pairs, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._utils.args import int_arg
    parser.add_argument('model', help='architecture, e.g. cifar_resnet20_kcla (optionally with .tag)')
    parser.add_argument('--checkpoint', required=True,
                        help="weights: safetensors, a state dict, a training checkpoint of timm's train.py or of "
                             "timm-layerattn train (model_best.pth.tar, last.pth.tar), an official KCLA / MRLA / "
                             "CNNtention file, or an MMDetection checkpoint (its backbone); read with "
                             "weights_only=True")
    parser.add_argument('--out', required=True, help='output folder (must not exist unless --overwrite)')
    parser.add_argument('--num-classes', type=int_arg(min=1), default=None,
                        help='default: the checkpoint classifier size')
    parser.add_argument('--in-chans', type=int_arg(min=1), default=None,
                        help='default: the checkpoint stem input channels')
    parser.add_argument('--tag', default=None, help='pretrained tag, e.g. mylab_cifar10 (default: dataset name)')
    parser.add_argument('--dataset', default=None, help='training dataset: cifar10, cifar100, imagenet-1k, or a Hub id')
    parser.add_argument('--metrics', default=None,
                        help='evaluation results as JSON (or @file.json), e.g. \'{"top1": 91.2, "top5": 99.7}\'')
    parser.add_argument('--label-names', default=None, help='class names: JSON list, JSON file, or a text file')
    parser.add_argument('--recipe', default=None, help='training recipe text for the card, or @file.md')
    parser.add_argument('--repo-id', default=None, help='Hub repo the folder is meant for (used in the usage snippet)')
    parser.add_argument('--license', default=None, help="licence of the weights (default: the architecture's)")
    parser.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                        help='extra model arguments, e.g. head_dim=64')
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument('--use-ema', dest='use_ema', action='store_true', default=False,
                     help="export the checkpoint's EMA weights (state_dict_ema); an error if it holds none")
    ema.add_argument('--no-ema', dest='use_ema', action='store_false',
                     help="export the raw weights (state_dict), the default, as timm's validate.py without --use-ema")
    parser.add_argument('--onnx', action='store_true',
                        help='also write model.onnx (dynamic batch / height / width), checked against the exported '
                             'weights with onnxruntime at two input shapes; needs onnx onnxruntime onnxscript')
    parser.add_argument('--features-only', action='store_true',
                        help="with --onnx: model.onnx is the features_only backbone (feature maps), not the classifier")
    parser.add_argument('--out-indices', type=int_arg(min=0), nargs='+', default=None, metavar='I',
                        help="with --features-only: the feature levels (timm's out_indices; default: all)")
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output folder if it is an earlier export (never any other folder)')


def run(args: argparse.Namespace) -> int:
    from .. import models  # noqa: F401  (registers the architectures)
    from .._utils.errors import UserError
    from ..hub import check_export_dir, export_folder, load_model_from_checkpoint
    metrics = _json_arg(args.metrics, '--metrics')
    if metrics is not None and not isinstance(metrics, dict):
        raise UserError('--metrics must be a JSON object of name -> number')
    recipe = args.recipe
    if recipe and recipe.startswith('@'):
        path = Path(recipe[1:])
        if not path.is_file():
            raise UserError(f'--recipe file not found: {path}')
        recipe = path.read_text(encoding='utf-8')
    if args.out_indices is not None and not args.features_only:
        raise UserError('--out-indices selects the feature levels of --features-only')
    if args.features_only and not args.onnx:
        raise UserError('--features-only chooses what model.onnx computes: add --onnx')
    if args.onnx:
        from ..hub.onnx import require_onnx
        require_onnx()  # before loading: name a missing package at once
    check_export_dir(args.out, args.overwrite)  # before loading: fail fast
    model, note = load_model_from_checkpoint(
        args.model, args.checkpoint, num_classes=args.num_classes, in_chans=args.in_chans,
        use_ema=args.use_ema, **_model_kwargs(args.model_kwargs))
    print(f'loaded {note} into {args.model} ({model.num_classes} classes)')
    out = export_folder(
        model, args.out, model_name=args.model, tag=args.tag, dataset=args.dataset, metrics=metrics,
        label_names=_label_names(args.label_names), recipe=recipe, overwrite=args.overwrite,
        repo_id=args.repo_id, license=args.license, onnx=args.onnx, onnx_features_only=args.features_only,
        onnx_out_indices=args.out_indices)
    print(f'wrote {out}: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    if args.onnx:
        _print_onnx(out)
    print(f"check it: timm.create_model('local-dir:{out}', pretrained=True)  (after import timm_layerattn)")
    return 0


def _print_onnx(out: Path) -> None:
    """One line on the ONNX graph: what it computes, its opset and how it compared with PyTorch."""
    from .._utils.files import read_marker
    record = (read_marker(out / 'config.json') or {}).get('onnx') or {}
    what = 'features_only backbone, outputs ' + ', '.join(record.get('outputs', [])) \
        if record.get('features_only') else 'classifier'
    checks = '; '.join(f"{'x'.join(map(str, c['shape']))}: max abs error {c['max_abs_err']:.2g}, "
                       f"relative {c['max_rel_err']:.2g}" for c in record.get('checked', []))
    print(f"model.onnx ({what}; opset {record.get('opset')}, dynamic batch / height / width) matches PyTorch in "
          f"onnxruntime {record.get('versions', {}).get('onnxruntime', '')} at {checks}")
