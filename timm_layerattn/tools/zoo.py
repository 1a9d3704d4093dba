"""`timm-layerattn list`: the model table (params, GMACs, family) of every registered model."""
import argparse
import fnmatch
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ['count_params', 'count_macs', 'model_table', 'format_table']


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_size: Tuple[int, int, int], device: str = 'meta') -> int:
    """Multiply-accumulates of one forward at `input_size` (the papers' "FLOPs").

    Counted by `torch.utils.flop_counter` (matmuls and convolutions; elementwise work is not counted,
    matching the convention of the papers' tables). Runs on the meta device by default: no compute.
    """
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros((1, *input_size), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def model_table(names: List[str], num_classes: Optional[int] = None) -> List[Dict]:
    """One row per model: name, params, GMACs at the model's default input size, input size, block, family."""
    import timm
    from ..families import find_family
    rows = []
    for name in names:
        kwargs = {} if num_classes is None else dict(num_classes=num_classes)
        model = timm.create_model(name, device='meta', **kwargs)
        input_size = tuple(model.pretrained_cfg['input_size'])
        cfg = getattr(model, 'cfg', None)
        rows.append(dict(
            model=name,
            params=count_params(model),
            gmacs=count_macs(model, input_size) / 1e9,
            input_size=input_size,
            block=getattr(cfg, 'block', ''),
            num_classes=model.num_classes,
            family=getattr(find_family(name), 'title', ''),
        ))
    return rows


def format_table(rows: List[Dict]) -> str:
    header = f'{"model":<34} {"params (M)":>11} {"GMACs":>8} {"input":>10} {"classes":>8}  {"block":<10}  family'
    lines = [header, '-' * len(header)]
    for r in rows:
        size = 'x'.join(str(s) for s in r['input_size'][1:])
        lines.append(
            f'{r["model"]:<34} {r["params"] / 1e6:>11.3f} {r["gmacs"]:>8.3f} {size:>10} {r["num_classes"]:>8}  {r["block"]:<10}  {r["family"]}')
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('filter', nargs='?', default='*', help='wildcard filter on model names (default: all)')
    from .._utils.args import int_arg
    parser.add_argument('--num-classes', type=int_arg(min=0), default=None,
                        help='count params for this many classes (0: without the classifier)')
    parser.add_argument('--markdown', action='store_true', help='print a markdown table')


def run(args: argparse.Namespace) -> int:
    from .. import models
    from .._utils.errors import UserError
    names = [n for n in models.list_models() if fnmatch.fnmatch(n, args.filter)]
    if not names:
        raise UserError(f'no registered model matches {args.filter!r}; see `timm-layerattn list`')
    rows = model_table(names, num_classes=args.num_classes)
    if args.markdown:
        print('| model | params (M) | GMACs | input | classes | block | family |\n|---|---:|---:|---:|---:|---|---|')
        for r in rows:
            size = 'x'.join(str(s) for s in r['input_size'][1:])
            print(f'| `{r["model"]}` | {r["params"] / 1e6:.3f} | {r["gmacs"]:.3f} | {size} | {r["num_classes"]} | {r["block"]} | {r["family"]} |')
    else:
        print(format_table(rows))
    return 0
