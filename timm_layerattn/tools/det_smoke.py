"""`timm-layerattn det-smoke CONFIG`: does an MMDetection config train and evaluate? Two iterations, on CPU.

CONFIG is a shipped config name (`timm-layerattn det-configs` lists them; `.py` may be left off) or the path
of any MMDetection config. The run generates a tiny COCO set in a temporary folder (removed afterwards,
also on errors), trains a couple of iterations from a random trunk (offline; `--pretrained` keeps the
config's ImageNet trunk init, downloaded on first use), runs the config's validation and test evaluation
(`CocoMetric`) and prints the losses and the metrics. Exit status 0 when every loss is finite and every
configured COCO metric came out; what the run changes in the config is listed in `timm_layerattn.det.smoke`.
"""
import argparse
import difflib
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from .._utils.args import int_arg
from .._utils.errors import UserError

__all__ = ['resolve_config', 'parse_cfg_options']


def resolve_config(config: str) -> Path:
    """A config path, or the shipped config of that name (with or without `.py`)."""
    from .det_configs import config_dir, list_configs
    path = Path(config).expanduser()
    if path.is_file():
        return path
    names = list_configs()
    for name in (config, f'{config}.py'):
        if name in names:
            return config_dir() / name
    if path.exists():
        raise UserError(f'config {config} is not a file')
    close = difflib.get_close_matches(path.name if path.name.endswith('.py') else f'{path.name}.py', names, n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    raise UserError(f"no config file and no shipped config named {config!r}{hint}; "
                    f"`timm-layerattn det-configs '*'` lists the shipped ones")


def parse_cfg_options(options: Optional[List[str]]) -> Dict[str, Any]:
    """`KEY=VALUE` pairs parsed as MMDetection's tools parse `--cfg-options` (mmengine's `DictAction`)."""
    if not options:
        return {}
    from mmengine.config import DictAction
    out: Dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UserError(f'--cfg-options takes KEY=VALUE pairs, got {item!r}')
        out[key] = DictAction._parse_iterable(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        'Smoke-test an MMDetection config: generate a tiny COCO set in a temporary folder, train a couple of '
        'iterations on CPU from a random trunk (offline), run the config\'s COCO evaluation, print the losses '
        'and the metrics; exit status 0 when all losses are finite and every configured metric came out.')
    parser.add_argument('config', help='shipped config name (see `timm-layerattn det-configs`) or a config file')
    parser.add_argument('--iters', type=int_arg(min=1), default=2, help='training iterations (default 2)')
    parser.add_argument('--batch-size', type=int_arg(min=1), default=2,
                        help='training images per iteration (default 2)')
    parser.add_argument('--pretrained', action='store_true',
                        help="keep the config's backbone weights init (the shipped configs: timm ImageNet trunk, "
                             "downloaded on first use) instead of a random trunk")
    parser.add_argument('--cfg-options', nargs='+', metavar='KEY=VALUE', default=None,
                        help='override config settings as MMDetection\'s tools do, e.g. '
                             'model.backbone.init_cfg.checkpoint=/path/to/resnet50.safetensors (with --pretrained)')
    parser.add_argument('--device', choices=('cpu', 'auto'), default='cpu',
                        help="'cpu' (default), or 'auto': mmengine's choice (a GPU if there is one; needs an mmcv "
                             "built with CUDA ops)")
    parser.add_argument('--seed', type=int_arg(min=0), default=0, help='seed of the generated data and the run')
    parser.add_argument('--verbose', action='store_true', help="show mmengine's log and the COCO evaluation tables")


def run(args: argparse.Namespace) -> int:
    path = resolve_config(args.config)
    with warnings.catch_warnings():  # mmengine's deprecation notice on pkg_resources, nothing a user can act on
        warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
        try:
            from ..det.checkpoint import WeightsNotFound
            from ..det.smoke import run_smoke
        except ImportError as e:  # no MMDetection stack: timm_layerattn.det names the fix
            raise UserError(str(e)) from None
        try:
            result = run_smoke(path, iters=args.iters, batch_size=args.batch_size, pretrained=args.pretrained,
                               cfg_options=parse_cfg_options(args.cfg_options), device=args.device,
                               seed=args.seed, verbose=args.verbose)
        except WeightsNotFound as e:  # printed whole (the CLI cuts messages at 200 characters): cache and option
            print(f'timm-layerattn det-smoke: error: {e}', file=sys.stderr)
            return 2
    evaluated = ' and '.join(result.metrics) or 'no'
    print(f'ok: {result.config} trained {len(result.losses)} iterations and ran {evaluated} evaluation '
          f'in {result.seconds:.1f} s')
    return 0
