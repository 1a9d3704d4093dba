"""CPU speed of the *official* ResNet-50 layer-attention models relative to timm's ``resnet50``.

Run (official checkouts outside the repository, see ``benchmarks/official.py``)::

    python benchmarks/bench_official.py --kcla-repo /tmp/official/KCLA --mrla-repo /tmp/official/MRLA \
        [--repeats 9] [--train-size 224] [--formats nchw channels_last] [--json out.json]

Protocol (``docs/design/performance.md#perf-protocol``): one process, ``torch.set_num_threads(2)`` (``--threads``),
batch 4, 224x224. Models are interleaved round-robin (the starting model rotates every round, so no
model always runs right after the same neighbour), ``--warmup`` untimed rounds first, the median of
``--repeats`` (>= 7) timed runs per model, reported as a ratio to ``resnet50`` timed in the same
rounds. Machines are noisy: compare ratios within one run, and run the script more than once. On a
shared machine under load, also look at the second table (median of per-round ratios, ratio of
minima, and the median ratio over "quiet" rounds in which every model ran within 1.25x of its own
fastest time): when the estimators disagree, the run was disturbed.

* inference: ``eval()`` + ``torch.inference_mode()``, one forward per timing;
* training step: ``train()``, ``zero_grad(set_to_none=True)`` + forward + cross-entropy on fixed
  random labels + backward + ``SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4).step()``, at
  ``--train-size`` (default 224); the script checks that every loss stayed finite.

Formats: ``nchw`` and ``channels_last`` (model via ``.to(memory_format=torch.channels_last)``, input
via ``.contiguous(memory_format=...)``), each format's ratios relative to ``resnet50`` in the same
format; the table also gives each model's channels_last time relative to NCHW ``resnet50``.
The official KCLA holds a 5-D parameter (``norm_d``, ``[1, g, 1, 1, 1]``) and
``Module.to(memory_format=torch.channels_last)`` raises on it; those rows are measured after
converting only the 4-D parameters/buffers (what ``.to`` does for everything else) and are marked
``*`` with the error recorded.

Models: ``resnet50`` (timm, baseline), ``kcla_d64`` (official ``resnet50_kcla``, code default head
dim 64), ``kcla_d32`` (same builder patched to head dim 32, the paper setting), ``mrlal``
(``resnet50_mrlal``), ``mrlab`` (``resnet50_mrlab``, deep stem); ``--with-resnet50c`` adds timm's
deep-stem ``resnet50c`` (MRLA-B's trunk). Weights are the builders' random init (speed does not
depend on them; no pretrained weights are loaded).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import load_official, official_commit, official_repo  # noqa: E402

BASELINE = 'resnet50'


def model_factories(kcla_repo: Optional[str], mrla_repo: Optional[str], with_resnet50c: bool
                    ) -> Dict[str, Callable[[], nn.Module]]:
    import timm
    f: Dict[str, Callable[[], nn.Module]] = {BASELINE: lambda: timm.create_model('resnet50')}
    if with_resnet50c:
        f['resnet50c'] = lambda: timm.create_model('resnet50c')
    f.update({
        'kcla_d64': lambda: load_official('resnet50_kcla', kcla_repo, mrla_repo),
        'kcla_d32': lambda: load_official('resnet50_kcla', kcla_repo, mrla_repo, head_dim=32),
        'mrlal': lambda: load_official('resnet50_mrlal', kcla_repo, mrla_repo),
        'mrlab': lambda: load_official('resnet50_mrlab', kcla_repo, mrla_repo),
    })
    return f


def to_channels_last(model: nn.Module) -> Optional[str]:
    """Convert in place; returns None, or the error of the strict ``.to`` when the 4-D-only fallback was used."""
    try:
        model.to(memory_format=torch.channels_last)
        return None
    except RuntimeError as e:
        err = str(e).splitlines()[0]
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return err


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int, label: str,
                log: Callable[[str], None]) -> Dict[str, List[float]]:
    names = list(steps)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            dt = _timed(steps[n])
            if r >= warmup:
                times[n].append(dt)
        log(f'  {label}: round {r + 1}/{warmup + repeats} ' +
            ('(warm-up)' if r < warmup else ' '.join(f'{n}={times[n][-1] * 1e3:.0f}' for n in names)))
    return times


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    factories = model_factories(args.kcla_repo, args.mrla_repo, args.with_resnet50c)
    names = list(factories)
    base_models = {n: f() for n, f in factories.items()}
    res: Dict = {'config': {k: v for k, v in vars(args).items()}, 'torch': torch.__version__,
                 'threads': torch.get_num_threads(), 'params': {n: sum(p.numel() for p in m.parameters())
                                                                for n, m in base_models.items()},
                 'conversion_errors': {}, 'infer_ms': {}, 'train_ms': {}, 'infer_runs_ms': {},
                 'train_runs_ms': {}}
    res['commits'] = {w: official_commit(official_repo(w, args.kcla_repo, args.mrla_repo)) for w in ('kcla', 'mrla')}
    g = torch.Generator().manual_seed(args.seed)
    x_inf = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    x_tr = torch.randn(args.batch, 3, args.train_size, args.train_size, generator=g)
    y_tr = torch.randint(0, 1000, (args.batch,), generator=g)

    for fmt in args.formats:
        mf = torch.channels_last if fmt == 'channels_last' else torch.contiguous_format
        models = {n: copy.deepcopy(m) for n, m in base_models.items()}
        if fmt == 'channels_last':
            for n, m in models.items():
                err = to_channels_last(m)
                if err:
                    res['conversion_errors'][n] = err
                    log(f'  {n}: strict channels_last conversion failed ({err}); converted 4-D tensors only')
        xi = x_inf.contiguous(memory_format=mf)
        xt = x_tr.contiguous(memory_format=mf)

        if not args.skip_infer:
            for m in models.values():
                m.eval()

            def infer_step(m: nn.Module) -> Callable[[], None]:
                def step() -> None:
                    with torch.inference_mode():
                        m(xi)
                return step
            t = interleaved({n: infer_step(m) for n, m in models.items()}, args.warmup, args.repeats,
                            f'infer {fmt}', log)
            res['infer_runs_ms'][fmt] = {n: [v * 1e3 for v in t[n]] for n in names}
            res['infer_ms'][fmt] = {n: statistics.median(t[n]) * 1e3 for n in names}

        if not args.skip_train:
            losses: Dict[str, List[float]] = {n: [] for n in names}

            def train_step(n: str, m: nn.Module) -> Callable[[], None]:
                m.train()
                opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

                def step() -> None:
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(m(xt), y_tr)
                    loss.backward()
                    opt.step()
                    losses[n].append(float(loss.detach()))
                return step
            t = interleaved({n: train_step(n, m) for n, m in models.items()}, args.train_warmup,
                            args.train_repeats, f'train {fmt}', log)
            res['train_runs_ms'][fmt] = {n: [v * 1e3 for v in t[n]] for n in names}
            res['train_ms'][fmt] = {n: statistics.median(t[n]) * 1e3 for n in names}
            bad = [n for n in names if not all(math.isfinite(v) for v in losses[n])]
            res.setdefault('nonfinite_loss', {})[fmt] = bad
            if bad:
                log(f'  WARNING: non-finite training loss for {bad} ({fmt})')
        del models
    return res


QUIET = 1.25


def quiet_rounds(runs: Dict[str, List[float]], tol: float = QUIET) -> List[int]:
    """Indices of rounds in which every model ran within ``tol`` x its own fastest time."""
    n = len(next(iter(runs.values())))
    mins = {k: min(v) for k, v in runs.items()}
    return [i for i in range(n) if all(v[i] <= tol * mins[k] for k, v in runs.items())]


def format_table(res: Dict) -> str:
    names = list(res['params'])
    fmts = list(dict.fromkeys(list(res['infer_ms']) + list(res['train_ms'])))
    star = set(res['conversion_errors'])
    cols = []
    for kind in ('infer', 'train'):
        for fmt in fmts:
            if fmt in res[f'{kind}_ms']:
                cols.append((kind, fmt))
    head = f'{"model":10s} {"params":>11s}'
    for kind, fmt in cols:
        tag = 'NCHW' if fmt == 'nchw' else 'CL'
        head += f' | {kind} {tag} ms  ratio'
        if fmt == 'channels_last' and 'nchw' in res[f'{kind}_ms']:
            head += '  /r50NCHW'
    lines = [head, '-' * len(head)]
    for n in names:
        row = f'{n:10s} {res["params"][n]:>11,}'
        for kind, fmt in cols:
            ms = res[f'{kind}_ms'][fmt]
            mark = '*' if fmt == 'channels_last' and n in star else ' '
            w = len(f' | {kind} {"NCHW" if fmt == "nchw" else "CL"} ms  ratio')
            cell = f'{ms[n]:8.0f} {ms[n] / ms[BASELINE]:5.2f}x{mark}'
            row += ' |' + cell.rjust(w - 2)
            if fmt == 'channels_last' and 'nchw' in res[f'{kind}_ms']:
                row += f'  {ms[n] / res[f"{kind}_ms"]["nchw"][BASELINE]:7.2f}x'
        lines.append(row)
    c = res['config']
    lines.append(f'batch {c["batch"]}, inference {c["size"]}x{c["size"]}, train step {c["train_size"]}x'
                 f'{c["train_size"]}, {res["threads"]} threads, medians of {c["repeats"]} (inference) / '
                 f'{c["train_repeats"]} (train) interleaved runs; ratio = median time / median resnet50 time in '
                 f'the same format; /r50NCHW = channels_last median / NCHW resnet50 median.')
    for n, e in res['conversion_errors'].items():
        lines.append(f'* {n}: Module.to(memory_format=channels_last) raised "{e}"; only 4-D tensors converted.')
    # robustness on loaded machines: other estimators of the same ratio
    lines.append('')
    lines.append('other estimators of the ratio to resnet50 (same format): median of per-round ratios / ratio of '
                 f'minima / median of per-round ratios over quiet rounds (every model within {QUIET:.2f}x of its '
                 'own fastest run; count in brackets)')
    head2 = f'{"model":10s}' + ''.join(f' | {kind} {"NCHW" if fmt == "nchw" else "CL"}'.ljust(31)
                                         for kind, fmt in cols)
    lines.append(head2)
    for n in names:
        row = f'{n:10s}'
        for kind, fmt in cols:
            runs = res[f'{kind}_runs_ms'][fmt]
            per_round = statistics.median(a / b for a, b in zip(runs[n], runs[BASELINE]))
            quiet = quiet_rounds(runs)
            q = (f'{statistics.median(runs[n][i] / runs[BASELINE][i] for i in quiet):5.2f}x[{len(quiet)}]'
                 if quiet else '  n/a   ')
            row += f' | {per_round:5.2f}x / {min(runs[n]) / min(runs[BASELINE]):5.2f}x / {q}'.ljust(31)
        lines.append(row)
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--kcla-repo', default=None)
    ap.add_argument('--mrla-repo', default=None)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=4)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--train-size', type=int, default=224)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=9)
    ap.add_argument('--train-warmup', type=int, default=1)
    ap.add_argument('--train-repeats', type=int, default=7)
    ap.add_argument('--formats', nargs='+', default=['nchw', 'channels_last'], choices=['nchw', 'channels_last'])
    ap.add_argument('--skip-infer', action='store_true')
    ap.add_argument('--skip-train', action='store_true')
    ap.add_argument('--with-resnet50c', action='store_true')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--json', default=None, help='write all timings here')
    ap.add_argument('--quiet', action='store_true')
    args = ap.parse_args(argv)
    if args.repeats < 7 or args.train_repeats < 7:
        ap.error('use at least 7 repeats')
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    res = run(args, log)
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
