"""`timm-layerattn bench`: speed and memory of layer-attention ResNets relative to a plain ResNet.

Every number is a ratio to a baseline measured in the same process, with the models interleaved
(round-robin over repeats) and the median taken, so machine noise hits all models alike. Absolute
times on shared machines move a lot between runs; compare ratios, and only within one run.
"""
import argparse
import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['BenchConfig', 'BenchResult', 'benchmark', 'activation_bytes', 'format_results', 'main_for_demo',
           'depth_sweep', 'plot_depth_sweep']

DEFAULT_MODELS = ('resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab')
ModelFactory = Callable[[], nn.Module]


@dataclass
class BenchConfig:
    batch_size: int = 4
    img_size: int = 224
    threads: Optional[int] = 2
    repeats: int = 7
    warmup: int = 2
    train: bool = True
    train_repeats: int = 5
    channels_last: bool = False
    device: str = 'cpu'
    amp: bool = False
    compile: bool = False
    steady_malloc: bool = False


@dataclass
class BenchResult:
    name: str
    params: int
    gmacs: float
    infer_ms: float = math.nan
    train_ms: float = math.nan
    act_mb: float = math.nan
    ratios: Dict[str, float] = field(default_factory=dict)


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one training forward (unique storages)."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def steady_glibc_malloc() -> bool:
    """Make glibc keep freed memory for reuse: no fresh mmap per large block, no trimming of the heap.

    By default glibc maps each block above a moving threshold afresh and returns it on free, so a new
    multi-MB tensor costs thousands of page faults, and how many depends on the allocation history (on
    these machines up to a third of ResNet-50's CPU time, changing with the order models run in).
    With steady thresholds every model reuses warm memory and the ratios reflect compute. Affects this
    process only; returns False where the C library has no `mallopt` (not glibc).
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all([
        mallopt(m_mmap_threshold, 32 << 20),  # glibc's largest allowed value on 64-bit
        mallopt(m_trim_threshold, 2 ** 31 - 1),
        mallopt(m_top_pad, 64 << 20),
    ])


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _prepare(factory: ModelFactory, cfg: BenchConfig) -> nn.Module:
    model = factory().to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def benchmark(
        models: Dict[str, ModelFactory],
        cfg: BenchConfig,
        baseline: str,
        log: Callable[[str], None] = print,
) -> List[BenchResult]:
    """Interleaved inference / train-step timings; ratios are relative to `baseline` (a key of `models`)."""
    from .zoo import count_macs, count_params
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.steady_malloc and not steady_glibc_malloc():
        log('  --steady-malloc: not a glibc C library; allocator left as it is')
    names = list(models)
    built = {n: _prepare(models[n], cfg) for n in names}
    results = {}
    for n, m in built.items():
        try:
            macs = count_macs(m, (3, cfg.img_size, cfg.img_size), device=cfg.device) / 1e9
        except Exception:  # foreign (official) models may not run under the flop counter
            macs = math.nan
        results[n] = BenchResult(n, count_params(m), macs)

    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast(cfg.device.split(':')[0], dtype=torch.bfloat16 if cfg.device == 'cpu' else torch.float16) \
        if cfg.amp else contextlib.nullcontext()

    # inference
    runners = {n: (torch.compile(m) if cfg.compile else m).eval() for n, m in built.items()}
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.inference_mode(), amp:
        for _ in range(cfg.warmup):
            for n in names:
                runners[n](x)
        for r in range(cfg.repeats):
            for n in names:
                _sync(cfg.device)
                t0 = time.perf_counter()
                runners[n](x)
                _sync(cfg.device)
                times[n].append(time.perf_counter() - t0)
            log(f'  inference round {r + 1}/{cfg.repeats}')
    for n in names:
        results[n].infer_ms = statistics.median(times[n]) * 1e3

    if cfg.train:
        opt = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in built.items()}
        target = torch.randint(0, 10, (cfg.batch_size,), device=cfg.device)
        ttimes: Dict[str, List[float]] = {n: [] for n in names}

        def step(n: str) -> None:
            runners[n].train()
            with amp:
                loss = nn.functional.cross_entropy(runners[n](x), target)
            loss.backward()
            opt[n].step()
            opt[n].zero_grad(set_to_none=True)

        for _ in range(1):
            for n in names:
                step(n)
        for r in range(cfg.train_repeats):
            for n in names:
                _sync(cfg.device)
                t0 = time.perf_counter()
                step(n)
                _sync(cfg.device)
                ttimes[n].append(time.perf_counter() - t0)
            log(f'  train round {r + 1}/{cfg.train_repeats}')
        for n in names:
            results[n].train_ms = statistics.median(ttimes[n]) * 1e3
            results[n].act_mb = activation_bytes(built[n], x) / 2 ** 20

    base = results[baseline]
    for r in results.values():
        r.ratios = dict(
            infer=r.infer_ms / base.infer_ms,
            train=r.train_ms / base.train_ms if cfg.train else math.nan,
            mem=r.act_mb / base.act_mb if cfg.train else math.nan,
        )
    return [results[n] for n in names]


def cpu_kernels_state() -> str:
    """How the layer-attention branches run on CPU in eager inference: fused kernels or PyTorch ops."""
    from ..layers import native
    if native.available():
        return 'fused'
    return f'pytorch ({native.last_error() or native.ENV + "=0"})'


PYTORCH_OPS_SUFFIX = ' pytorch-ops'
PLAIN_AUTOGRAD_SUFFIX = ' plain-autograd'


class WithPyTorchOps(nn.Module):
    """Runs a model with the fused CPU kernels off, to time both paths in the same run."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..layers import native
        with native.disabled():
            return self.model(x)


class WithPlainAutograd(nn.Module):
    """Runs a model with the memory-lean training Functions off (plain autograd over the module path)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..layers import lean
        with lean.disabled():
            return self.model(x)


def format_results(results: Sequence[BenchResult], cfg: BenchConfig, baseline: str) -> str:
    head = (f'device={cfg.device} threads={cfg.threads} batch={cfg.batch_size} img={cfg.img_size} '
            f'channels_last={cfg.channels_last} amp={cfg.amp} compile={cfg.compile} '
            f'median of {cfg.repeats} (train {cfg.train_repeats}), interleaved; ratios vs {baseline}')
    if cfg.steady_malloc:
        head += '; steady malloc'
    if cfg.device == 'cpu':
        head += f'\nlayer-attention CPU kernels: {cpu_kernels_state()}'
        if any(r.name.endswith(PYTORCH_OPS_SUFFIX) for r in results):
            head += f' (rows "<model>{PYTORCH_OPS_SUFFIX}" run without them)'
    if cfg.train:
        from ..layers import lean
        head += f'\ntraining path: memory-lean autograd Functions (mode {lean.mode()})'
        if any(r.name.endswith(PLAIN_AUTOGRAD_SUFFIX) for r in results):
            head += f'; rows "<model>{PLAIN_AUTOGRAD_SUFFIX}" train with plain autograd'
    cols = f'{"model":<28} {"params(M)":>9} {"GMACs":>6} {"infer ms":>9} {"x":>6} {"train ms":>9} {"x":>6} {"act MB":>7} {"x":>6}'
    lines = [head, cols, '-' * len(cols)]
    for r in results:
        lines.append(
            f'{r.name:<28} {r.params / 1e6:>9.2f} {r.gmacs:>6.2f} {r.infer_ms:>9.1f} {r.ratios["infer"]:>5.2f}x '
            f'{r.train_ms:>9.1f} {r.ratios["train"]:>5.2f}x {r.act_mb:>7.1f} {r.ratios["mem"]:>5.2f}x')
    return '\n'.join(lines)


def timm_factory(name: str, pytorch_ops: bool = False, plain_autograd: bool = False, **kwargs) -> ModelFactory:
    """Builds `name` with timm; `pytorch_ops=True` wraps it to run without the fused CPU kernels,
    `plain_autograd=True` to train without the memory-lean Functions."""
    def make() -> nn.Module:
        import timm
        from .. import models  # noqa: F401  (registers our models)
        model = timm.create_model(name, **kwargs)
        if pytorch_ops:
            model = WithPyTorchOps(model)
        return WithPlainAutograd(model) if plain_autograd else model
    return make


DEPTH_SERIES = {
    # family -> [(model, baseline)] at increasing depth
    'cifar': {
        'KCLA': [(f'cifar_resnet{d}_kcla', f'cifar_resnet{d}') for d in (20, 56, 110)],
        'MRLA-L': [(f'cifar_resnet{d}_mrlal', f'cifar_resnet{d}') for d in (20, 56, 110)],
        'MRLA-B': [(f'cifar_resnet{d}_mrlab', f'cifar_resnet{d}') for d in (20, 56, 110)],
        # the quadratic ones: every block re-reads (full layer attention) or re-weights (DLA-B) its whole stage
        'Layer Att': [(f'cifar_resnet{d}_la', f'cifar_resnet{d}') for d in (20, 56, 110)],
        'DLA-B': [(f'cifar_resnet{d}_dynlab', f'cifar_resnet{d}') for d in (20, 56, 110)],
    },
    'imagenet': {
        'KCLA': [(f'resnet{d}_kcla', f'resnet{d}') for d in (50, 101)],
        'MRLA-L': [(f'resnet{d}_mrlal', f'resnet{d}') for d in (50, 101)],
        'MRLA-B': [(f'resnet{d}_mrlab', f'resnet{d}') for d in (50, 101)],
    },
}


SweepPoint = Tuple[int, float, float, float]


def depth_sweep(suite: str, cfg: BenchConfig, log: Callable[[str], None] = print) -> Dict[str, List[SweepPoint]]:
    """Per family: (depth, inference-time ratio, training-step-time ratio, activation-memory ratio) against the
    plain net of the same depth."""
    import re
    out: Dict[str, List[SweepPoint]] = {}
    by_baseline: Dict[str, List[Tuple[str, str]]] = {}
    for family, pairs in DEPTH_SERIES[suite].items():
        for model, base in pairs:
            by_baseline.setdefault(base, []).append((family, model))
    for base, members in by_baseline.items():
        log(f'depth sweep: {base} and its variants')
        factories = {base: timm_factory(base), **{m: timm_factory(m) for _, m in members}}
        res = {r.name: r for r in benchmark(factories, cfg, baseline=base, log=lambda s: None)}
        depth = int(re.search(r'resnet(\d+)', base).group(1))
        for family, model in members:
            r = res[model].ratios
            out.setdefault(family, []).append((depth, r['infer'], r['train'], r['mem']))
    return out


def plot_depth_sweep(sweep: Dict[str, List[SweepPoint]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = ('inference time', 'training step time', 'training activation memory')
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for family, pts in sweep.items():
        pts = sorted(pts)
        depths = [p[0] for p in pts]
        for i, ax in enumerate(axes):
            ax.plot(depths, [(p[i + 1] - 1) * 100 for p in pts], marker='o', label=family)
    for ax, what in zip(axes, panels):
        ax.set_title(f'{what} overhead', fontsize=10)
        ax.set_xlabel('depth')
        ax.set_ylabel('% over the plain ResNet of the same depth')
        ax.axhline(0, color='grey', lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    from .._utils.files import atomic_file
    with atomic_file(path) as f:
        fig.savefig(f, format='png', dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._utils.args import int_arg
    parser.add_argument('--models', default=','.join(DEFAULT_MODELS), help='comma-separated model names')
    parser.add_argument('--baseline', default='resnet50', help='timm model every ratio refers to')
    parser.add_argument('--batch-size', type=int_arg(min=1), default=4)
    parser.add_argument('--img-size', type=int_arg(min=16), default=224)
    parser.add_argument('--threads', type=int_arg(min=0), default=2, help='CPU threads (0: leave torch default)')
    parser.add_argument('--repeats', type=int_arg(min=1), default=7, help='timed inference rounds (median taken)')
    parser.add_argument('--train-repeats', type=int_arg(min=1), default=5, help='timed training-step rounds')
    parser.add_argument('--no-train', action='store_true', help='skip training-step timing and memory')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', action='store_true', help='autocast (bf16 on CPU, fp16 on CUDA)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--steady-malloc', action='store_true',
                        help='glibc: keep freed memory for reuse (no page-fault lottery between models)')
    parser.add_argument('--pytorch-ops', action='store_true',
                        help='also time each model with the fused CPU kernels off (extra rows, same run)')
    parser.add_argument('--plain-autograd', action='store_true',
                        help='also time each model training with plain autograd, without the memory-lean '
                             'Functions (extra rows, same run)')
    parser.add_argument('--plot', default=None, metavar='FILE.png',
                        help='also sweep depth and save a PNG of the overheads (an existing PNG is replaced, '
                             'any other file is not)')
    parser.add_argument('--plot-suite', default='cifar', choices=sorted(DEPTH_SERIES))


_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _check_plot_path(path: Path) -> None:
    """`--plot` may replace an earlier plot (a PNG), never another file or a folder."""
    from .._utils.errors import UserError
    from .._utils.files import check_writable
    if path.is_dir():
        raise UserError(f'--plot {path} is a folder; give a file name, e.g. overheads.png')
    if os.path.lexists(path):
        try:
            with path.open('rb') as f:
                is_png = path.is_file() and f.read(8) == _PNG_MAGIC
        except OSError:
            is_png = False
        if not is_png:
            raise UserError(f'--plot {path} exists and is not a PNG; it is never replaced (choose another name)')
    check_writable(path.absolute().parent, '--plot folder')


def _config(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        batch_size=args.batch_size, img_size=args.img_size, threads=args.threads or None, repeats=args.repeats,
        train=not args.no_train, train_repeats=args.train_repeats, channels_last=args.channels_last,
        device=args.device, amp=args.amp, compile=args.compile, steady_malloc=args.steady_malloc)


def run(args: argparse.Namespace) -> int:
    import timm
    from .. import models
    from .._utils.errors import UserError
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    if not names:
        raise UserError('--models names no model; give comma-separated names, e.g. resnet50_kcla,resnet50_mrlal')
    for n in [args.baseline, *names]:
        if not timm.is_model(n):
            raise UserError(f'unknown model {n!r}; see `timm-layerattn list`')
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise UserError(f'--device {args.device!r}: {str(e).splitlines()[0]}') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError('--device cuda given but CUDA is not available')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f'--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif device.type not in ('cpu', 'cuda', 'mps', 'xpu'):
        raise UserError(f'--device {args.device}: bench runs on cpu, cuda, mps or xpu')
    if args.plot:
        _check_plot_path(Path(args.plot))  # now, not after minutes of benchmarking
    cfg = _config(args)
    factories = {args.baseline: timm_factory(args.baseline), **{n: timm_factory(n) for n in names}}
    if args.pytorch_ops:
        factories.update({n + PYTORCH_OPS_SUFFIX: timm_factory(n, pytorch_ops=True) for n in names})
    if args.plain_autograd:
        factories.update({n + PLAIN_AUTOGRAD_SUFFIX: timm_factory(n, plain_autograd=True) for n in names})
    results = benchmark(factories, cfg, baseline=args.baseline)
    print(format_results(results, cfg, args.baseline))
    if args.plot:
        suite_cfg = BenchConfig(
            batch_size=32 if args.plot_suite == 'cifar' else 2, img_size=32 if args.plot_suite == 'cifar' else 224,
            threads=cfg.threads, repeats=5, train_repeats=3, device=cfg.device)
        sweep = depth_sweep(args.plot_suite, suite_cfg)
        plot_depth_sweep(sweep, args.plot, f'Overhead vs depth ({args.plot_suite}, {cfg.device})')
        for family, pts in sweep.items():
            print(f'{family:<8} ' + '  '.join(f'depth {d}: inference {i:.2f}x train {t:.2f}x memory {m:.2f}x'
                                              for d, i, t, m in sorted(pts)))
        print(f'plot saved to {args.plot}')
    return 0


def main_for_demo(log: Callable[[str], None] = print) -> List[BenchResult]:
    """Short CPU benchmark used by `timm-layerattn demo` (fewer repeats than `bench`)."""
    cfg = BenchConfig(repeats=5, train_repeats=3)
    factories = {'resnet50': timm_factory('resnet50'), **{n: timm_factory(n) for n in DEFAULT_MODELS}}
    results = benchmark(factories, cfg, baseline='resnet50', log=lambda s: None)
    log(format_results(results, cfg, 'resnet50'))
    return results
