"""What the same-run benchmark scripts share (`bench_resnet50.py`, `bench_trunks.py`): the timing flags, the
`BenchConfig` they set, our models' factories with their extra rows, and the ours-vs-official lines."""
import argparse
from typing import Callable, Dict, Iterable, List, Mapping

import torch.nn as nn

from timm_layerattn.tools.bench import PLAIN_AUTOGRAD_SUFFIX, PYTORCH_OPS_SUFFIX, BenchConfig, timm_factory

__all__ = ['add_timing_arguments', 'bench_config', 'our_factories', 'vs_official_lines']


def add_timing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--batch-size', type=int, default=4)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--train-repeats', type=int, default=5)
    p.add_argument('--no-train', action='store_true')
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--steady-malloc', action='store_true',
                   help='glibc: keep freed memory for reuse, so page faults do not depend on the run order')
    p.add_argument('--pytorch-ops', action='store_true',
                   help='also time our models with the fused CPU kernels off (same run)')
    p.add_argument('--plain-autograd', action='store_true',
                   help='also time our models training with plain autograd, without the memory-lean Functions')


def bench_config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        batch_size=args.batch_size, img_size=args.img_size, threads=args.threads, repeats=args.repeats,
        train=not args.no_train, train_repeats=args.train_repeats, channels_last=args.channels_last,
        device=args.device, amp=args.amp, compile=args.compile, steady_malloc=args.steady_malloc)


def our_factories(baseline: str, names: Iterable[str], args: argparse.Namespace) -> Dict[str, Callable[[], nn.Module]]:
    """The baseline and our models, plus their PyTorch-ops / plain-autograd rows where the flags ask for them."""
    names = list(names)
    out = {n: timm_factory(n) for n in [baseline, *names]}
    if args.pytorch_ops:
        out.update({n + PYTORCH_OPS_SUFFIX: timm_factory(n, pytorch_ops=True) for n in names})
    if args.plain_autograd:
        out.update({n + PLAIN_AUTOGRAD_SUFFIX: timm_factory(n, plain_autograd=True) for n in names})
    return out


def vs_official_lines(results, pairs: Mapping[str, str], cfg: BenchConfig, label: Mapping[str, str]) -> List[str]:
    """One line per (our model, official model) pair: our time and memory relative to the official model's."""
    by_name = {r.name: r for r in results}
    lines = []
    for ours, official in pairs.items():
        o, r = by_name[ours], by_name[official]
        line = f'{label.get(ours, ours)} vs official: inference {o.infer_ms / r.infer_ms:.2f}x'
        plain = by_name.get(ours + PYTORCH_OPS_SUFFIX)
        if plain is not None:
            line += f' ({plain.infer_ms / r.infer_ms:.2f}x with PyTorch ops only)'
        if cfg.train:
            line += f', train step {o.train_ms / r.train_ms:.2f}x, activation memory {o.act_mb / r.act_mb:.2f}x'
        lines.append(line + ' (lower is better)')
    return lines
