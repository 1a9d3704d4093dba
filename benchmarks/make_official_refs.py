"""Write reference weights, inputs and outputs of the *official* KCLA / MRLA models.

Run (official checkouts outside the repository, see ``benchmarks/official.py``)::

    python benchmarks/make_official_refs.py --out /tmp/official_refs \
        --kcla-repo /tmp/official/KCLA --mrla-repo /tmp/official/MRLA [--refs resnet50_kcla ...]

Needs ``safetensors`` and, for the MRLA-B models, ``einops``. Never write the output into the
repository (``*.safetensors`` is git-ignored anyway).

Reference names (``--refs``; default all): every name of :data:`official.OFFICIAL_MODELS` built with
the official defaults, plus ``resnet{50,101}_kcla_hd32`` = the official KCLA builder patched to
head dim 32 (``load_official(..., head_dim=32)``, the paper's setting; without the suffix it is the
code default 64).

``--verify`` instead rebuilds each official model, loads ``<ref>.safetensors`` with ``strict=True``
and reruns every stored input (all stored tensors must match exactly).

For every reference ``<ref>`` the output directory gets:

``<ref>.safetensors``
    The official ``state_dict()`` with the official key names, every entry (incl. KCLA's frozen
    ``norm_d``, the unused init-cell tensors and ``num_batches_tracked``). Metadata (all strings):
    ``format`` (``official-ref-v1``), ``ref``, ``model`` (our name), ``build_kwargs`` (JSON, what
    ``load_official`` got), ``repo``, ``commit``, ``file``, ``builder``, ``forward``, ``seed``,
    ``randomization``, ``torch``, ``param_total``, ``param_trainable``.
``<ref>.io.safetensors``
    Eval-mode tensors, one set per input size ``S`` = ``HxW`` (ImageNet: ``224x224`` and
    ``97x131``; CIFAR: ``32x32``), batch 2:
    ``input.S`` (the seeded input), ``output.S`` (logits), ``stem.S`` (input of the first
    residual block, i.e. after the stem / max-pool), ``stage{i}.S`` (output of stage ``i``, i.e.
    of its last block *including* the layer-attention term; i = 1..4 ImageNet, 1..3 CIFAR).
    Metadata: ``ref``, ``sizes`` (JSON list), ``input_seed``.

plus ``official_keys.json``: per reference the state_dict keys with shape and dtype, parameter
counts (``total`` = ``sum(p.numel() for p in parameters())`` incl. KCLA's frozen ``norm_d``,
``trainable``, ``used`` = trainable minus the structurally unused tensors, ``with_grad_measured``),
the documented numbers (``docs/design/layer_attention.md#la-param-counts``; ``spec_param_counts``) and any
mismatch (``spec_mismatches``), the structurally unused parameters,
the parameters that got an exactly-zero gradient on this reference input beyond those
(``zero_grad_on_this_input``: saturated sigmoid/softmax, i.e. weak test sensitivity), output and
stage statistics and, for KCLA, how often the key-weight exponent hits its clamp (a clamped head
makes the output insensitive to ``Wk`` through the history weight). The script exits 1 on any
mismatch with the documented numbers.

Weights ("non-trivial", so that every parameter and buffer influences the output):

1. Build under ``torch.manual_seed(seed)`` (the official init: kaiming convs, xavier conv1d, MRLA-L
   ``lambda_t ~ N(0, 1)``, ``bn3.weight = 0`` on ImageNet).
2. Every BatchNorm: ``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.1)`` (this also removes the zero-init
   of ``bn3``).
3. Running statistics are *calibrated* and then perturbed: reset, ``momentum=None`` (cumulative
   average), ``calib_batches`` train-mode forwards under ``no_grad`` on seeded N(0,1) inputs
   (ImageNet 8x3x112x112, CIFAR 8x3x32x32) with every DropPath switched off; then
   ``running_mean += s * N(0, 0.05) * sqrt(running_var)`` and ``running_var *= 1 + s * (U(0.8, 1.25) - 1)``
   with ``s = 1``, halved (same random draws) until no stage-output std on a probe input exceeds
   twice its calibrated value (``s`` is recorded; it is 1 except for deep KCLA, e.g. CIFAR
   KCLA-110 keeps 0.5). Why: plain random statistics (mean ~ N(0, 0.1), var ~ U(0.5, 1.5)) do not
   normalise anything, so eval activations grow geometrically with depth (CIFAR ResNet-110 logits
   ~1e4-1e7 with the official init alone), sigmoids saturate (exactly-zero gradients for whole
   ``Wq``/``Wk`` tensors) and KCLA's key exponent sits at its clamp for >90% of the heads; even
   on calibrated statistics, perturbations compound over depth (0.1 std / U(0.5, 1.5) gives R50
   stage-4 std ~300 and CIFAR KCLA-110 logits ~1e5). Eval outputs still differ from train-mode
   (batch-statistics) outputs by O(0.1-1) relative, so an implementation that normalised with
   batch statistics in eval would not pass.
4. Nothing else is changed (``norm_d`` and ``lambda_t`` stay as built; there are no other
   zero-initialised tensors: the script asserts that no floating-point parameter is constant).

All random draws come from ``torch.Generator`` objects seeded from ``--seed`` and the reference
name, so a reference does not depend on which other references are generated.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official import (OFFICIAL_MODELS, load_official, official_commit, official_repo)  # noqa: E402

FORMAT = 'official-ref-v1'
IMAGENET_SIZES = ((224, 224), (97, 131))
CIFAR_SIZES = ((32, 32),)
BATCH = 2
# running-statistics perturbation after calibration: mean += N(0, STAT_MEAN_SHIFT) * std, var *= U(VAR_LO, VAR_HI).
# Larger values (0.1 / U(0.5, 1.5)) compound over depth: R50 stage-4 std ~300 instead of ~2.
STAT_MEAN_SHIFT = 0.05
VAR_LO, VAR_HI = 0.8, 1.25
PERTURB_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)  # tried in order, see randomize()

# ref name -> (our model name, load_official kwargs)
REFS: Dict[str, Tuple[str, Dict]] = {n: (n, {}) for n in OFFICIAL_MODELS}
REFS['resnet50_kcla_hd32'] = ('resnet50_kcla', {'head_dim': 32})
REFS['resnet101_kcla_hd32'] = ('resnet101_kcla', {'head_dim': 32})

# docs/design/layer_attention.md#la-param-counts: ref -> {classes: (total, trainable, used)} (None: not stated).
# "used" = trainable minus the structurally unused tensors (see structurally_unused); the docs give it for KCLA
# and state "no unused parameters" for MRLA-L / plain ResNet. For MRLA-B they also say "no unused parameters",
# which only holds for `grad is None`: the stage-first blocks' Wq get an exactly-zero gradient, so "used" is
# not compared there.
_CIFAR_SPEC = {  # depth: {classes: (ResNet, KCLA, MRLA-L, MRLA-B)}
    20: {10: (220_378, 235_507, 231_182, 230_286), 100: (243_508, 258_637, 254_312, 253_416)},
    56: {10: (591_322, 627_723, 623_734, 621_046), 100: (614_452, 650_853, 646_864, 644_176)},
    110: {10: (1_147_738, 1_216_047, 1_212_562, 1_207_186), 100: (1_170_868, 1_239_177, 1_235_692, 1_230_316)},
}
_NORM_D = {20: 56, 56: 168, 110: 336}


def _spec_counts() -> Dict[str, Dict[int, Tuple[Optional[int], Optional[int], Optional[int]]]]:
    s: Dict[str, Dict[int, Tuple[Optional[int], Optional[int], Optional[int]]]] = {
        'resnet50_kcla': {1000: (25_859_078, 25_858_842, 25_850_133)},
        'resnet50_kcla_hd32': {1000: (25_812_610, 25_812_138, None)},
        'resnet50_mrlal': {1000: (25_738_452, 25_738_452, 25_738_452)},
        'resnet50_mrlab': {1000: (25_742_580, 25_742_580, None)},
        'resnet101_kcla': {1000: (45_082_309, 45_081_801, 45_040_324)},
        'resnet101_kcla_hd32': {1000: (45_032_785, 45_031_769, None)},
        'resnet101_mrlal': {1000: (44_939_646, 44_939_646, 44_939_646)},
        'resnet101_mrlab': {1000: (44_926_366, 44_926_366, None)},
    }
    for depth, per_cls in _CIFAR_SPEC.items():
        for cls, (plain, kcla, mrlal, mrlab) in per_cls.items():
            s.setdefault(f'cifar_resnet{depth}', {})[cls] = (plain, plain, plain)
            tr = kcla - _NORM_D[depth]
            s.setdefault(f'cifar_resnet{depth}_kcla', {})[cls] = (kcla, tr, tr - 643)
            s.setdefault(f'cifar_resnet{depth}_mrlal', {})[cls] = (mrlal, mrlal, mrlal)
            s.setdefault(f'cifar_resnet{depth}_mrlab', {})[cls] = (mrlab, mrlab, None)
    return s


SPEC_COUNTS = _spec_counts()
SPEC_STATE_DICT_LEN = {'resnet50_kcla': 508, 'resnet50_mrlal': 464, 'resnet50_mrlab': 460}


def _gen(seed: int, ref: str, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f'{ref}/{purpose}'.encode()))


def _is_cifar(model_name: str) -> bool:
    return model_name.startswith('cifar_')


def _bns(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomize(model: nn.Module, ref: str, seed: int, calib_size: Tuple[int, int], calib_batches: int = 2,
              calib_batch_size: int = 8) -> float:
    """Give ``model`` non-trivial BN parameters and statistics (see module docstring).

    Returns the running-statistics perturbation scale that was kept.
    """
    g = _gen(seed, ref, 'bn')
    bns = _bns(model)
    for bn in bns:
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
    # calibrate running statistics (train mode, cumulative average, DropPath off)
    saved_drop = {}
    for m in model.modules():
        if hasattr(m, 'drop_prob'):
            saved_drop[m] = m.drop_prob
            m.drop_prob = 0.0
    saved_mom = {}
    for bn in bns:
        saved_mom[bn] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    gx = _gen(seed, ref, 'calib')
    for _ in range(calib_batches):
        model(torch.randn(calib_batch_size, 3, *calib_size, generator=gx))
    for m, p in saved_drop.items():
        m.drop_prob = p
    for bn in bns:
        bn.momentum = saved_mom[bn]
    model.eval()

    # perturb the statistics; back off (halve the scale) while any stage output std grows > 2x
    probe = torch.randn(2, 3, *calib_size, generator=_gen(seed, ref, 'probe'))
    calibrated = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    gs = _gen(seed, ref, 'stats')
    draws = [(torch.randn(bn.running_mean.shape, generator=gs), torch.rand(bn.running_var.shape, generator=gs))
             for bn in bns]
    base = _stage_stds(model, probe)
    scale = 1.0
    for scale in PERTURB_SCALES:
        for bn, (mean, var), (z, u) in zip(bns, calibrated, draws):
            bn.running_mean.copy_(mean + z * (STAT_MEAN_SHIFT * scale) * var.sqrt())
            bn.running_var.copy_(var * (1 + scale * (VAR_LO - 1 + u * (VAR_HI - VAR_LO))))
        stds = _stage_stds(model, probe)
        if all(math.isfinite(s) and s <= 2 * b for s, b in zip(stds, base)):
            break
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() > 1 and name.rsplit('.', 1)[-1] != 'norm_d':
            assert not torch.all(p == p.flatten()[0]), f'{ref}: parameter {name} is constant'
    return scale


def _stage_stds(model: nn.Module, x: torch.Tensor) -> List[float]:
    taps = run_with_taps(model, x)
    return [float(taps[k].std()) for k in sorted(taps) if k.startswith('stage')] + [float(taps['output'].std())]


def _stage_modules(model: nn.Module) -> Tuple[nn.Module, List[nn.Module]]:
    """(first residual block, module whose output is stage i's output) for every official layout."""
    if hasattr(model, 'stages'):  # MRLA-B ImageNet/CIFAR, KCLA CIFAR: ModuleList of ModuleLists
        return model.stages[0][0], [st[-1] for st in model.stages]
    layers = [getattr(model, f'layer{i}') for i in range(1, 5) if hasattr(model, f'layer{i}')]
    first = layers[0].layers[0] if hasattr(layers[0], 'layers') else layers[0][0]  # KCLA ImageNet wrapper
    return first, layers


def run_with_taps(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Eval forward returning the logits, the stem output and each stage output."""
    first, stages = _stage_modules(model)
    taps: Dict[str, torch.Tensor] = {}
    hooks = [first.register_forward_pre_hook(lambda m, a: taps.__setitem__('stem', a[0].detach().clone()))]
    for i, st in enumerate(stages, 1):
        def hook(m, a, out, i=i):
            taps[f'stage{i}'] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
        hooks.append(st.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            taps['output'] = model(x).clone()
    finally:
        for h in hooks:
            h.remove()
    return taps


def kcla_clamp_stats(model: nn.Module, x: torch.Tensor) -> Optional[Dict[str, float]]:
    """Fraction of (sample, head) key weights whose exponent ``||K_h|| / norm_d`` reaches the clamp 10."""
    cells = [m for m in model.modules() if type(m).__name__ == 'kcla_layer']
    if not cells:
        return None
    vals: List[torch.Tensor] = []

    def pre(m, args):
        xt = args[0]
        b, c = xt.shape[:2]
        k = m.Wk(xt.mean((2, 3)).view(b, 1, c)).view(b, m.heads, m.head)
        vals.append((k.norm(dim=2) / m.norm_d.view(1, -1)).flatten())

    hooks = [c.register_forward_pre_hook(pre) for c in cells]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    e = torch.cat(vals)
    return {'clamped_fraction': float((e >= 10).float().mean()), 'exponent_min': float(e.min()),
            'exponent_median': float(e.median()), 'exponent_max': float(e.max())}


def grad_check(model: nn.Module, x: torch.Tensor, seed: int, ref: str) -> List[str]:
    """Names of trainable parameters that get no (or an all-zero) gradient in an eval-mode backward."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    w = torch.randn(out.shape, generator=_gen(seed, ref, 'grad'))
    (out * w).sum().backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    model.zero_grad(set_to_none=True)
    return dead


def structurally_unused(model: nn.Module, family: str) -> List[str]:
    """Parameters that cannot influence the output, by rule (``docs/design/layer_attention.md#la-unused-modules``
    and ``#la-mrla-base-forward``).

    KCLA: the network's first cell never receives state, so its ``adjust_channel``, ``u_Wk``, ``u_bn``
    are unused; any later init cell whose incoming channel count equals its own (ImageNet
    ``layer3.attention.11`` in R101) skips ``adjust_channel``. MRLA-B: at the first block of a stage
    the softmax runs over one token (weight exactly 1), so that block's ``Wq`` has no effect (its
    gradient is exactly zero, not ``None``).
    """
    names = [n for n, _ in model.named_parameters()]
    out: List[str] = []
    if family == 'kcla':
        cells = [(n, m) for n, m in model.named_modules() if type(m).__name__ == 'kcla_layer' and m.init_layer]
        for idx, (n, m) in enumerate(cells):
            first_in_stage = n.endswith('.0') or n.endswith('.0.kcla')
            mods = ('adjust_channel', 'u_Wk', 'u_bn') if idx == 0 else (() if first_in_stage else ('adjust_channel',))
            out += [p for p in names if any(p.startswith(f'{n}.{mm}.') for mm in mods)]
    elif family == 'mrlab':
        out += [n for n in names if re.fullmatch(r'stages\.\d+\.0\.mrla\.mrla\.Wq\.weight', n)]
    return out


def _count(model: nn.Module) -> Tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


def _stats(t: torch.Tensor) -> Dict[str, float]:
    t = t.double()
    return {'mean': float(t.mean()), 'std': float(t.std()), 'absmax': float(t.abs().max()),
            'finite': bool(torch.isfinite(t).all())}


def make_ref(ref: str, out_dir: Path, seed: int, kcla_repo: Optional[str], mrla_repo: Optional[str],
             commits: Dict[str, Optional[str]]) -> Dict:
    from safetensors.torch import save_file
    model_name, load_kwargs = REFS[ref]
    entry = OFFICIAL_MODELS[model_name]
    cifar = _is_cifar(model_name)
    sizes = CIFAR_SIZES if cifar else IMAGENET_SIZES
    t0 = time.time()

    torch.manual_seed(seed)
    model = load_official(model_name, kcla_repo, mrla_repo, **load_kwargs)
    total, trainable = _count(model)
    scale = randomize(model, ref, seed, calib_size=(32, 32) if cifar else (112, 112))

    # inputs / outputs
    gin = _gen(seed, ref, 'input')
    io: Dict[str, torch.Tensor] = {}
    info: Dict = {'outputs': {}}
    for (h, w) in sizes:
        s = f'{h}x{w}'
        x = torch.randn(BATCH, 3, h, w, generator=gin)
        io[f'input.{s}'] = x
        for k, v in run_with_taps(model, x).items():
            io[f'{k}.{s}'] = v.contiguous()
        info['outputs'][s] = {k: _stats(io[f'{k}.{s}']) for k in ('output', 'stem') +
                              tuple(f'stage{i}' for i in range(1, 5) if f'stage{i}.{s}' in io)}
    clamp = {f'{h}x{w}': kcla_clamp_stats(model, io[f'input.{h}x{w}']) for (h, w) in sizes}
    if any(v is not None for v in clamp.values()):
        info['kcla_key_exponent'] = clamp

    # state dict (official names, every entry)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {
        'format': FORMAT, 'ref': ref, 'model': model_name, 'build_kwargs': json.dumps(load_kwargs),
        'repo': {'kcla': 'bgx666/KCLA', 'mrla': 'joyfang1106/MRLA'}[entry.repo],
        'commit': commits.get(entry.repo) or 'unknown', 'file': entry.file, 'builder': entry.builder,
        'forward': entry.forward, 'seed': str(seed),
        'randomization': 'bn weight U(0.5,1.5), bias N(0,0.1); running stats calibrated (train-mode, '
                         'momentum=None, DropPath off) '
                         f'then mean += N(0,{STAT_MEAN_SHIFT}*s)*std, var *= 1+s*(U({VAR_LO},{VAR_HI})-1), s={scale}',
        'stat_perturbation_scale': str(scale),
        'torch': torch.__version__, 'param_total': str(total), 'param_trainable': str(trainable),
    }
    save_file(sd, str(out_dir / f'{ref}.safetensors'), metadata=meta)
    save_file(io, str(out_dir / f'{ref}.io.safetensors'),
              metadata={'ref': ref, 'sizes': json.dumps([f'{h}x{w}' for h, w in sizes]), 'input_seed': str(seed)})

    # parameters that receive no gradient (eval mode, smallest input) vs the structural rule
    h, w = sizes[-1]
    dead = grad_check(model, io[f'input.{h}x{w}'], seed, ref)
    unused = structurally_unused(model, entry.family)
    by_name = dict(model.named_parameters())
    n_unused = sum(by_name[n].numel() for n in unused)
    with_grad = trainable - sum(by_name[n].numel() for n in dead)

    # counts vs the documented ones (CIFAR: also the 100-class build)
    counts = {str(1000 if not cifar else 10): {'total': total, 'trainable': trainable, 'used': trainable - n_unused,
                                               'with_grad_measured': with_grad}}
    if cifar:
        torch.manual_seed(seed)
        m100 = load_official(model_name, kcla_repo, mrla_repo, num_classes=100, **load_kwargs)
        t100, tr100 = _count(m100)
        counts['100'] = {'total': t100, 'trainable': tr100, 'used': tr100 - n_unused}
    mismatches = []
    spec = SPEC_COUNTS.get(ref, {})
    for cls, got in counts.items():
        exp = spec.get(int(cls))
        if exp is None:
            mismatches.append(f'{cls} classes: no documented value')
            continue
        for label, e in zip(('total', 'trainable', 'used'), exp):
            if e is not None and got[label] != e:
                mismatches.append(f'{cls} classes {label}: official {got[label]:,} vs documented {e:,}')
    live_unused = sorted(set(unused) - set(dead))
    if live_unused:
        mismatches.append(f'structurally unused but receiving a gradient: {live_unused}')
    if ref in SPEC_STATE_DICT_LEN and len(sd) != SPEC_STATE_DICT_LEN[ref]:
        mismatches.append(f'state_dict entries: official {len(sd)} vs documented {SPEC_STATE_DICT_LEN[ref]}')

    info.update({
        'model': model_name, 'build_kwargs': load_kwargs, 'repo': meta['repo'], 'commit': meta['commit'],
        'file': entry.file, 'builder': entry.builder, 'forward': entry.forward,
        'param_counts': counts, 'spec_param_counts': {str(c): v for c, v in spec.items()},
        'spec_mismatches': mismatches, 'stat_perturbation_scale': scale,
        'structurally_unused': unused, 'params_without_grad': dead,
        'zero_grad_on_this_input': sorted(set(dead) - set(unused)),
        'state_dict_len': len(sd),
        'state_dict': {k: {'shape': list(v.shape), 'dtype': str(v.dtype).replace('torch.', '')}
                       for k, v in sd.items()},
        'seconds': round(time.time() - t0, 1),
    })
    return info


def verify_ref(ref: str, out_dir: Path, kcla_repo: Optional[str], mrla_repo: Optional[str]) -> Dict[str, float]:
    """Rebuild the official model, load ``<ref>.safetensors`` strictly, rerun every stored input.

    Returns the max |difference| per stored tensor (0.0 expected: same code, same weights, CPU).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(out_dir / f'{ref}.safetensors'), 'pt') as f:
        meta = f.metadata()
    sd = load_file(str(out_dir / f'{ref}.safetensors'))
    io = load_file(str(out_dir / f'{ref}.io.safetensors'))
    model = load_official(meta['model'], kcla_repo, mrla_repo, **json.loads(meta['build_kwargs']))
    model.load_state_dict(sd, strict=True)
    model.eval()
    diffs: Dict[str, float] = {}
    for key in sorted(k for k in io if k.startswith('input.')):
        size = key.split('.', 1)[1]
        for k, v in run_with_taps(model, io[key]).items():
            diffs[f'{k}.{size}'] = float((v - io[f'{k}.{size}']).abs().max())
    return diffs


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default='/tmp/official_refs')
    ap.add_argument('--kcla-repo', default=None)
    ap.add_argument('--mrla-repo', default=None)
    ap.add_argument('--refs', nargs='*', default=None, help=f'subset of: {" ".join(REFS)}')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--verify', action='store_true',
                    help='check existing files instead: rebuild, load strictly, compare every stored tensor')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    refs = args.refs or list(REFS)
    unknown = [r for r in refs if r not in REFS]
    if unknown:
        ap.error(f'unknown refs {unknown}')
    out = Path(args.out)
    if args.verify:
        bad = 0
        for ref in refs:
            d = verify_ref(ref, out, args.kcla_repo, args.mrla_repo)
            worst = max(d.values())
            bad += worst != 0.0
            print(f'{ref:24s} {len(d)} tensors, max |diff| {worst:.3g}', flush=True)
        return 1 if bad else 0
    out.mkdir(parents=True, exist_ok=True)
    commits = {}
    for which in {OFFICIAL_MODELS[REFS[r][0]].repo for r in refs}:
        commits[which] = official_commit(official_repo(which, args.kcla_repo, args.mrla_repo))
    json_path = out / 'official_keys.json'
    summary = json.loads(json_path.read_text()) if json_path.exists() else {}
    summary.setdefault('_about', {})
    summary['_about'].update({'format': FORMAT, 'seed': args.seed, 'torch': torch.__version__,
                              'commits': {**summary['_about'].get('commits', {}), **commits}})
    failed = 0
    for ref in refs:
        info = make_ref(ref, out, args.seed, args.kcla_repo, args.mrla_repo, commits)
        summary[ref] = info
        json_path.write_text(json.dumps(summary, indent=1))
        c = info['param_counts']
        first = next(iter(c.values()))
        o = next(iter(info['outputs'].values()))['output']
        status = 'OK' if not info['spec_mismatches'] else 'MISMATCH: ' + '; '.join(info['spec_mismatches'])
        failed += bool(info['spec_mismatches'])
        extra = ''
        if 'kcla_key_exponent' in info:
            extra = ' clamp=' + '/'.join(f'{v["clamped_fraction"]:.2f}' for v in info['kcla_key_exponent'].values())
        extra += f' s={info["stat_perturbation_scale"]:g}'
        print(f'{ref:24s} total={first["total"]:>11,} trainable={first["trainable"]:>11,} '
              f'used={first["used"]:>11,} sd={info["state_dict_len"]:4d} out std={o["std"]:.3g} '
              f'absmax={o["absmax"]:.3g}{extra} unused={len(info["structurally_unused"])} '
              f'zero-grad-extra={len(info["zero_grad_on_this_input"])} '
              f'{info["seconds"]}s  {status}', flush=True)
    print(f'wrote {out}/<ref>.safetensors, <ref>.io.safetensors and {json_path}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
