"""Layer-attention models on one timm trunk vs that trunk, and vs the official code, in one process.

One command per trunk (the official checkouts are optional; see ``benchmarks/official.py``)::

    python benchmarks/bench_trunks.py --trunk deit_tiny_patch16_224 --official-mrla /tmp/official/MRLA
    python benchmarks/bench_trunks.py --trunk efficientnet_b0 --official-mrla-2915aff /tmp/official/MRLA-2915aff
    python benchmarks/bench_trunks.py --trunk resnet18                # no official code exists for it
    python benchmarks/bench_trunks.py --trunk deit_tiny_patch16_224 --official-mrla /tmp/official/MRLA --check-only
    python benchmarks/bench_trunks.py --trunk cifar_resnet56 --official-kcla /tmp/official/KCLA   # the baselines
    python benchmarks/bench_trunks.py --trunk resnet50 --models resnet50_dynlal,resnet50_rla,resnet50_la \\
        --official-dla /tmp/official/Dynamic-Layer-Attention --official-rla /tmp/official/RLANet \\
        --official-mrla /tmp/official/MRLA

Rows: timm's ``--trunk`` (the baseline every ratio refers to), our models on it (default: every registered
``<trunk>_<family>`` of ``FAMILIES``; ``--models`` picks), and for each of ours that the official code builds, the
official model, named by its official builder (``deit_mrlal_tiny_patch16_224``, ``efficientnet_mrla_b0``,
``dla_l``, ...). The timing is ``timm_layerattn.tools.bench.benchmark``, as in ``timm-layerattn bench``: every
model built once, interleaved round-robin, median of the repeats; inference in ``eval()`` under
``torch.inference_mode()``; a training step is forward + cross-entropy + backward + SGD; activation memory is what
autograd keeps for backward in one training forward. Defaults: batch 4, 224², 2 threads, 7 inference / 5 training
repeats. Weights are the builders' random init (speed does not depend on them). DeiT rows need ``--img-size 224``:
timm's ``deit_*`` and the official patch embedding both assert the size they were built for; CIFAR rows take
``--img-size 32``.

Before timing, each official model is checked against ours (``--no-check`` skips, ``--check-only`` stops after
it): its parameter count must equal our model's (or differ by exactly the official parameters that never run,
which the converter reports as dropped), and with its weights made non-trivial (every parameter perturbed,
BatchNorm statistics calibrated) and converted by ``timm_layerattn.convert_official``, our model built with
default arguments (DLA: ``batch_coupled_gate=True``, the official batched forward) must give the same eval logits
(batch 2, the trunk's input size, max |difference| relative to the official logits' largest magnitude, ``--tol``
1e-4). A failed check stops the run: the rows would not time the same model. The timed rows are our models with
their defaults.
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _same_run import add_timing_arguments, bench_config, our_factories, vs_official_lines  # noqa: E402
from timm_layerattn.tools.bench import benchmark, format_results  # noqa: E402

FAMILIES = ('kcla', 'mrlal', 'mrlab', 'se', 'eca', 'dia', 'dynlal', 'dynlab', 'la', 'linla', 'rla')
CHECK_BATCH = 2
# official.py's checkouts, each a --official-<name> option, and the repository each is a checkout of
OFFICIAL_NAMES = {'kcla': 'bgx666/KCLA', 'mrla': 'joyfang1106/MRLA', 'mrla_2915aff': 'joyfang1106/MRLA@2915aff^',
                  'dla': 'tunantu/Dynamic-Layer-Attention', 'rla': 'joyfang1106/RLANet'}
REPOS = tuple(OFFICIAL_NAMES)


def default_models(trunk: str) -> List[str]:
    import timm
    import timm_layerattn  # noqa: F401  (registers our models)
    return [f'{trunk}_{f}' for f in FAMILIES if timm.is_model(f'{trunk}_{f}')]


def official_pairs(models: Sequence[str], repos: Dict[str, Optional[str]]) -> Dict[str, str]:
    """Ours -> official row label, for the models whose official code has a checkout given here."""
    from official import OFFICIAL_BASELINE_MODELS, OFFICIAL_TRUNK_MODELS
    table = {**OFFICIAL_TRUNK_MODELS, **OFFICIAL_BASELINE_MODELS}
    return {n: table[n].builder for n in models if n in table and repos.get(table[n].repo)}


def official_factory(name: str, repos: Dict[str, Optional[str]]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from official import load_official
        return load_official(name, **{f'{r}_repo': path for r, path in repos.items()})
    return make


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def make_non_trivial(model: nn.Module, seed: int, size: int) -> None:
    """Perturb every parameter (the official inits leave heads at zero, norms at one) and calibrate BatchNorm
    statistics on random inputs, so that every tensor of the official layout changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(CHECK_BATCH, 3, size, size, generator=gen))
    model.eval()


def check_pair(ours: str, official_model: nn.Module, tol: float) -> Tuple[bool, str]:
    """(ok, one-line report): parameter counts and eval logits of ``ours`` holding the official weights."""
    import timm
    from official import official_entry
    from timm_layerattn.convert import convert_official_with_report
    parity_kwargs = official_entry(ours).parity_kwargs
    model = timm.create_model(ours, **parity_kwargs)
    size = model.pretrained_cfg['input_size'][-1]
    make_non_trivial(official_model, seed=0, size=size)
    official_sd = official_model.state_dict()
    converted, report = convert_official_with_report(official_sd, ours)
    model.load_state_dict(converted, strict=True)
    model.eval()
    n_ours, n_official = count_params(model), count_params(official_model)
    dropped = sum(official_sd[k].numel() for k in getattr(report, 'dropped', ()) if k in dict(
        official_model.named_parameters()))
    x = torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = official_model(x), model(x)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    rel = (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-12)
    ok = n_ours == n_official - dropped and rel <= tol
    never_run = f' - {dropped:,} never run' if dropped else ''
    line = (f'params {n_ours:,} (ours) / {n_official:,} (official{never_run})'
            f'{"" if n_ours == n_official - dropped else " DIFFER"}; '
            f'eval logits max rel diff {rel:.1e} (batch {CHECK_BATCH}, {size}², tol {tol:g}'
            f'{"".join(f", ours with {k}={v!r}" for k, v in parity_kwargs.items())})')
    return ok, line


def run_checks(pairs: Dict[str, str], repos: Dict[str, Optional[str]], tol: float) -> bool:
    all_ok = True
    for ours, label in pairs.items():
        torch.manual_seed(0)
        ok, line = check_pair(ours, official_factory(ours, repos)(), tol)
        print(f'check {ours} = official {label}: {line}{"" if ok else "  FAILED"}', flush=True)
        all_ok &= ok
    return all_ok


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--trunk', required=True, help="timm baseline, e.g. deit_tiny_patch16_224, efficientnet_b0")
    p.add_argument('--models', default=None, help='comma-separated; default: every registered <trunk>_<family>')
    p.add_argument('--official-kcla', default=None, help='checkout of github.com/bgx666/KCLA (CIFAR baselines)')
    p.add_argument('--official-mrla', default=None, help='checkout of github.com/joyfang1106/MRLA (DeiT, eq. 4)')
    p.add_argument('--official-mrla-2915aff', default=None,
                   help='joyfang1106/MRLA checked out at 2915aff^ (EfficientNet)')
    p.add_argument('--official-dla', default=None, help='checkout of github.com/tunantu/Dynamic-Layer-Attention')
    p.add_argument('--official-rla', default=None, help='checkout of github.com/joyfang1106/RLANet')
    p.add_argument('--no-check', action='store_true', help='time without checking the official models first')
    p.add_argument('--check-only', action='store_true', help='check the official models, do not time')
    p.add_argument('--tol', type=float, default=1e-4, help='check: max logits difference, relative')
    add_timing_arguments(p)
    args = p.parse_args(argv)

    import timm
    import timm_layerattn  # noqa: F401
    repos = {r: getattr(args, f'official_{r}') for r in REPOS}
    for repo in repos.values():
        if repo and not os.path.isdir(repo):
            p.error(f'not a directory: {repo}')
    models = [n.strip() for n in args.models.split(',') if n.strip()] if args.models else default_models(args.trunk)
    for n in [args.trunk, *models]:
        if not timm.is_model(n):
            p.error(f'unknown model {n!r}')
    if not models:
        p.error(f'no layer-attention model is registered on {args.trunk!r}; give --models')
    pairs = official_pairs(models, repos)
    if any(repos.values()) and not pairs:
        print(f'note: the official code given builds none of {", ".join(models)}', flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if pairs and not args.no_check:
        if not run_checks(pairs, repos, args.tol):
            print('an official model does not match ours: not timing (use --no-check to time anyway)')
            return 1
    if args.check_only:
        return 0

    cfg = bench_config(args)
    factories = our_factories(args.trunk, models, args)
    factories.update({label: official_factory(ours, repos) for ours, label in pairs.items()})
    results = benchmark(factories, cfg, baseline=args.trunk)
    print(format_results(results, cfg, args.trunk))
    if pairs:
        from official import official_commit, official_entry, official_repo
        for ours, label in pairs.items():
            e = official_entry(ours)
            root = official_repo(e.repo, **{f'{r}_repo': path for r, path in repos.items()})
            sha = official_commit(root)
            print(f'{label}: official {OFFICIAL_NAMES[e.repo]} {e.file} @ {sha[:7] if sha else "?"} ({root})')
    if pairs:
        print('\n'.join(vs_official_lines(results, pairs, cfg, {})))
    return 0


if __name__ == '__main__':
    sys.exit(main())
