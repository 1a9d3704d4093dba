"""Parity of `timm_layerattn.convert_official` against the *official* KCLA / MRLA code.

Two sources of truth, each optional (with neither, the script reports "skipped" and exits 0):

* `--refs DIR`: reference files written by `benchmarks/make_official_refs.py` (the official models' state
  dicts with official key names, plus inputs, logits and stage outputs computed by the official code).
* `--kcla-repo` / `--mrla-repo`: local checkouts of github.com/bgx666/KCLA and github.com/joyfang1106/MRLA.
  The official models are built through `benchmarks/official.py` (branch `official-harness`), given
  non-trivial weights (random BatchNorm affine, calibrated running statistics), and run next to ours.

For every model: official state dict -> `convert_official` -> `timm.create_model(name, ...)` with
`strict=True` -> same input through both -> max |difference| of the logits (and stage outputs, with
`--refs`) relative to the reference's scale. With checkouts both models also run in float64 (rows `fp64`):
agreement there to ~1e-9 shows the computation is the same, whatever rounding does in float32. Nothing of
the official code is imported unless a checkout is given, and it is never copied into this repository.

    python benchmarks/official_parity.py --refs /tmp/official_refs
    python benchmarks/official_parity.py --kcla-repo /tmp/official/KCLA --mrla-repo /tmp/official/MRLA
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
F64_TOL = 1e-9  # float64 runs of the checkouts: same math up to rounding


def _rel(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    diff = (a.double() - b.double()).abs().max().item()
    return diff, diff / max(b.double().abs().max().item(), 1e-12)


def _our_model(name: str, state_dict: Dict[str, torch.Tensor], head_dim: Optional[int] = None):
    """Our model holding the converted official weights (KCLA's head dim read from the checkpoint if not given)."""
    import timm
    from timm_layerattn import convert_official
    from timm_layerattn.checkpoints.kcla_mrla import infer_head_dim as infer_kcla_head_dim
    head_dim = head_dim or infer_kcla_head_dim(state_dict)
    converted = convert_official(state_dict, name, head_dim=head_dim)
    kwargs = {'num_classes': converted['fc.weight'].shape[0]}
    if head_dim is not None:
        kwargs['head_dim'] = head_dim
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _ours_taps(model, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        out = {'output': model.forward_head(final), 'stem': model.maxpool(taps[0])}
    out.update({f'stage{i}': t for i, t in enumerate(taps[1:], start=1)})
    return out


def run_refs(ref_dir: Path, only: List[str], tol: float) -> List[dict]:
    import safetensors
    import safetensors.torch
    rows = []
    for io_file in sorted(ref_dir.glob('*.io.safetensors')):
        ref = io_file.name[:-len('.io.safetensors')]
        if only and ref not in only:
            continue
        weights_file = ref_dir / f'{ref}.safetensors'
        with safetensors.safe_open(str(weights_file), 'pt') as f:
            meta = f.metadata() or {}
        name = meta.get('model', ref)
        head_dim = json.loads(meta.get('build_kwargs', '{}')).get('head_dim')
        model = _our_model(name, safetensors.torch.load_file(str(weights_file)), head_dim)
        io = safetensors.torch.load_file(str(io_file))
        with safetensors.safe_open(str(io_file), 'pt') as f:
            sizes = json.loads((f.metadata() or {}).get('sizes', '[]'))
        for size in sizes:
            ours = _ours_taps(model, io[f'input.{size}'])
            for tap in ['output', 'stem'] + sorted(k for k in ours if k.startswith('stage')):
                key = f'{tap}.{size}'
                if key in io:
                    diff, rel = _rel(ours[tap], io[key])
                    rows.append(dict(model=ref, size=size, tap=tap, abs=diff, rel=rel, ok=rel <= tol))
    return rows


def _non_trivial(model: torch.nn.Module, x: torch.Tensor, seed: int) -> None:
    """Random BN affine + running statistics calibrated on random inputs (so every tensor matters)."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for m in model.modules():  # no stochastic depth during calibration
            if type(m).__name__ == 'DropPath':
                m.eval()
        for _ in range(2):
            model(torch.randn(x.shape, generator=gen))
    model.eval()


def run_checkouts(kcla_repo: Optional[str], mrla_repo: Optional[str], only: List[str], tol: float) -> List[dict]:
    sys.path.insert(0, str(HERE))
    try:
        import official
    except ImportError:
        raise SystemExit('benchmarks/official.py (branch official-harness) is needed to build the official models')
    rows = []
    names = only or list(official.OFFICIAL_MODELS)
    for name in names:
        entry = official.OFFICIAL_MODELS[name]
        repo = kcla_repo if entry.repo == 'kcla' else mrla_repo
        if repo is None:
            continue
        head_dims = [None, 32] if name.startswith('resnet') and name.endswith('_kcla') else [None]
        for head_dim in head_dims:
            torch.manual_seed(0)
            kwargs = {} if head_dim is None else {'head_dim': head_dim}
            ref_model = official.load_official(name, kcla_repo=kcla_repo, mrla_repo=mrla_repo, **kwargs)
            size = 32 if name.startswith('cifar') else 64
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
            _non_trivial(ref_model, x, seed=2)
            model = _our_model(name, ref_model.state_dict())
            label = name if head_dim is None else f'{name} (head_dim {head_dim})'
            # float32 within `tol`; float64 to ~1e-9, which shows the math is identical and any float32 gap is
            # rounding amplified by depth (random R101 weights reach logits in the thousands).
            for dtype, limit in ((torch.float32, tol), (torch.float64, F64_TOL)):
                with torch.no_grad():
                    ref = ref_model.to(dtype)(x.to(dtype))
                    ours = model.to(dtype)(x.to(dtype))
                diff, rel = _rel(ours, ref)
                tap = 'output' if dtype == torch.float32 else 'fp64'
                rows.append(dict(model=label, size=f'{size}x{size}', tap=tap, abs=diff, rel=rel, ok=rel <= limit))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--refs', default=None, help='directory written by make_official_refs.py')
    parser.add_argument('--kcla-repo', default=None, help='checkout of github.com/bgx666/KCLA')
    parser.add_argument('--mrla-repo', default=None, help='checkout of github.com/joyfang1106/MRLA')
    parser.add_argument('--models', nargs='*', default=[], help='restrict to these names / references')
    parser.add_argument('--tol', type=float, default=1e-4, help='max |difference| relative to the reference scale')
    parser.add_argument('--json', default=None, help='also write the rows to this JSON file')
    args = parser.parse_args(argv)
    import timm_layerattn  # noqa: F401
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    if args.refs and Path(args.refs).is_dir():
        rows += run_refs(Path(args.refs), args.models, args.tol)
    if args.kcla_repo or args.mrla_repo:
        for repo in (args.kcla_repo, args.mrla_repo):
            if repo and not Path(repo).is_dir():
                raise SystemExit(f'not a directory: {repo}')
        rows += run_checkouts(args.kcla_repo, args.mrla_repo, args.models, args.tol)
    if not rows:
        print('skipped: no official references (--refs) or checkouts (--kcla-repo / --mrla-repo) given or found')
        return 0
    print(f'{"model":<36} {"size":>8} {"tap":>7} {"max |diff|":>12} {"relative":>10}  ok')
    for r in rows:
        ok = 'yes' if r['ok'] else 'NO'
        print(f'{r["model"]:<36} {r["size"]:>8} {r["tap"]:>7} {r["abs"]:>12.3e} {r["rel"]:>10.2e}  {ok}')
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    bad = [r for r in rows if not r['ok']]
    f64 = [r for r in rows if r['tap'] == 'fp64']
    f32 = [r for r in rows if r['tap'] != 'fp64']
    print(f'{sum(r["ok"] for r in f32)}/{len(f32)} float32 outputs within {args.tol:g} of the official outputs'
          + (f'; {sum(r["ok"] for r in f64)}/{len(f64)} float64 outputs within {F64_TOL:g}' if f64 else ''))
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
