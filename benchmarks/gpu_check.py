"""One short GPU check of every family: correctness on the device, AMP numerics, training speed and peak memory.

Run through `benchmarks/gpu_check.sh` on a lent GPU machine (a budget of a few minutes), or with
`--device cpu --quick` here to check the script itself. Three parts, each printed as a markdown table:

1. **Correctness**: one model of every family, eval-mode float32 logits on the device against the CPU
   (TF32 off), relative max error; and the training path: gradients of one float32 train step of the
   KCLA / MRLA nets on the device, memory-lean Functions against the plain-ops path and against the CPU.
2. **AMP numerics**: a train-mode forward + backward under float16 and bfloat16 autocast on all-zero,
   random and 300x-scaled random inputs; outputs and gradients must be finite (the plain ResNet alongside).
3. **Training throughput and peak memory** of the ResNet-50s against timm `resnet50`, measured in the same
   process and interleaved: images/s of an SGD step under bf16 autocast with channels_last, eager and
   `torch.compile`d, and `torch.cuda.max_memory_allocated` of a step. Eager rows include each model with the
   memory-lean Functions off ("plain autograd"), to show what they cost or save on the device. The official
   implementations join when their checkouts are given (`--official-kcla`, `--official-mrla`, see
   `official.py`). Then the other trunks, each against its own timm model (eager): ResNet-18, EfficientNet-B0,
   DeiT-Tiny.

Exit status 1 when a correctness or numerics check fails.
"""
import argparse
import contextlib
import datetime
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # official.py beside this file
import timm  # noqa: E402
import timm_layerattn  # noqa: E402,F401  (registers the models)
from timm_layerattn.layers import lean  # noqa: E402
from timm_layerattn.tools.bench import WithPlainAutograd  # noqa: E402

# One model per family (CIFAR sizes keep the CPU side of the comparison short), then the ImageNet ones.
FAMILY_MODELS = [
    ('cifar_resnet20_kcla', 32), ('cifar_resnet20_mrlal', 32), ('cifar_resnet20_mrlab', 32),
    ('cifar_resnet50_as_kv', 32), ('cifar_resnet20_basic_mha', 32), ('resnet18_gradattn_rope', 64),
    ('resnet50_kcla', 224), ('resnet50_mrlal', 224), ('resnet50_mrlab', 224), ('resnet50_as_stages', 224),
    ('resnet18_kcla', 224), ('efficientnet_b0_mrlal', 224), ('deit_tiny_patch16_224_mrlal', 224),
    ('deit_tiny_patch16_224_mrlab', 224), ('deit_tiny_patch16_224_kcla', 224),
]
NUMERICS_MODELS = ['resnet50', 'resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab', 'resnet50_as_stages',
                   'efficientnet_b0_mrlal', 'deit_tiny_patch16_224_mrlal', 'deit_tiny_patch16_224_mrlab']
# The other trunks (issue 22), each against its own timm model, eager only (compiling each costs a minute).
TRUNK_SPEED = [('resnet18', ['resnet18_kcla', 'resnet18_mrlal', 'resnet18_mrlab']),
               ('efficientnet_b0', ['efficientnet_b0_mrlal']),
               ('deit_tiny_patch16_224', ['deit_tiny_patch16_224_mrlal', 'deit_tiny_patch16_224_mrlab',
                                          'deit_tiny_patch16_224_kcla'])]
SPEED_MODELS = ['resnet50', 'resnet50_kcla', 'resnet50_mrlal', 'resnet50_mrlab']
TRAIN_MODELS = ['cifar_resnet20_kcla', 'cifar_resnet20_mrlal', 'cifar_resnet20_mrlab']
PLAIN = ' (plain autograd)'
OFFICIAL = {'resnet50_kcla': 'official KCLA', 'resnet50_mrlal': 'official MRLA-L', 'resnet50_mrlab': 'official MRLA-B'}


def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def check_correctness(device: str, quick: bool) -> Tuple[List[str], bool]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, ok = ['| model | input | max abs error | relative |', '|---|---|---:|---:|'], True
    for name, size in FAMILY_MODELS[:4] if quick else FAMILY_MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = model(x)
            out = model.to(device)(x.to(device)).cpu()
        err = float((out - ref).abs().max())
        rel = err / max(float(ref.abs().max()), 1e-12)
        ok &= rel <= 1e-4
        rows.append(f'| `{name}` | 2×3×{size}² | {err:.2e} | {rel:.2e}{"" if rel <= 1e-4 else " **FAIL**"} |')
    rows += ['', '| train step (float32) | lean vs plain on the device | device vs CPU (lean) |', '|---|---:|---:|']
    for name in TRAIN_MODELS[:1] if quick else TRAIN_MODELS:
        grads = {}
        for where, dev in (('cpu', 'cpu'), ('device', device)):
            for path in ('lean', 'plain'):
                torch.manual_seed(0)
                model = timm.create_model(name, drop_path_rate=0.1).to(dev).train()
                x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dev)
                torch.manual_seed(2)  # the same drop-path draws on both paths
                with lean.disabled() if path == 'plain' else contextlib.nullcontext():
                    model(x).logsumexp(-1).sum().backward()
                grads[where, path] = torch.cat([p.grad.flatten().cpu() for p in model.parameters()])
        scale = float(grads['cpu', 'plain'].abs().max())
        paths = float((grads['device', 'lean'] - grads['device', 'plain']).abs().max()) / scale
        devices = float((grads['device', 'lean'] - grads['cpu', 'lean']).abs().max()) / scale
        passed = paths <= 1e-3 and devices <= 1e-3
        ok &= passed
        rows.append(f'| `{name}` | {paths:.2e} | {devices:.2e}{"" if passed else " **FAIL**"} |')
    return rows, ok


def _finite_step(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Tuple[bool, bool]:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype):
        out = model(x)
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.isfinite(out).all()), all(bool(torch.isfinite(g).all()) for g in grads)


def check_numerics(device: str, quick: bool) -> Tuple[List[str], bool]:
    size, batch = (64, 2) if quick else (224, 8)
    x = torch.randn(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    inputs = {'zero': torch.zeros_like(x), 'random': x, 'random ×300': x * 300}
    rows = ['| model | dtype | ' + ' | '.join(inputs) + ' |', '|---|---|' + '---|' * len(inputs)]
    ok = True
    for name in NUMERICS_MODELS[:2] if quick else NUMERICS_MODELS:
        torch.manual_seed(0)
        model = timm.create_model(name).to(device).train()
        for dtype in (torch.float16, torch.bfloat16):
            cells = []
            for kind, inp in inputs.items():
                out_ok, grad_ok = _finite_step(model, inp, dtype)
                ok &= out_ok and grad_ok
                cells.append('finite' if out_ok and grad_ok else f'**out {out_ok}, grad {grad_ok}**')
            rows.append(f'| `{name}` | {str(dtype).split(".")[1]} | ' + ' | '.join(cells) + ' |')
    return rows, ok


def _factories(official_kcla: Optional[str], official_mrla: Optional[str],
               plain: bool) -> Dict[str, Callable[[], nn.Module]]:
    out: Dict[str, Callable[[], nn.Module]] = {n: (lambda n=n: timm.create_model(n)) for n in SPEED_MODELS}
    if plain:
        out.update({n + PLAIN: (lambda n=n: WithPlainAutograd(timm.create_model(n))) for n in SPEED_MODELS[1:]})
    if official_kcla or official_mrla:
        from official import load_official
        for ours, label in OFFICIAL.items():
            repo_ok = official_kcla if 'kcla' in ours else official_mrla
            if repo_ok:
                out[label] = lambda n=ours: load_official(n, kcla_repo=official_kcla, mrla_repo=official_mrla)
    return out


def measure_training(device: str, quick: bool, official_kcla: Optional[str], official_mrla: Optional[str],
                     compile_modes: Tuple[bool, ...], baseline: str = 'resnet50',
                     models_of: Optional[Callable[[bool], Dict[str, Callable[[], nn.Module]]]] = None) -> List[str]:
    """Training throughput and peak memory against `baseline` (the ResNet-50s and the official code by default;
    `models_of(plain)` gives other factories, the baseline first)."""
    batch, size, steps, warmup = (2, 64, 2, 1) if quick else (64, 224, 10, 3)
    if quick and baseline.startswith('deit'):
        size = 224  # timm's ViTs take their configured size only
    amp_dtype = torch.bfloat16
    rows = [f'| model | compile | images/s | time × {baseline} | peak memory (GiB) | memory × {baseline} |',
            '|---|---|---:|---:|---:|---:|']
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    for compiled in compile_modes:
        factories = (models_of or (lambda plain: _factories(official_kcla, official_mrla, plain)))(not compiled)
        models, opts, steps_of = {}, {}, {}
        for name, make in factories.items():
            torch.manual_seed(0)
            model = make().to(device).to(memory_format=torch.channels_last).train()
            models[name] = model
            opts[name] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            steps_of[name] = torch.compile(model) if compiled else model
        peak: Dict[str, float] = {}
        times: Dict[str, List[float]] = {n: [] for n in models}

        def step(name: str) -> None:
            with torch.autocast(x.device.type, dtype=amp_dtype):
                loss = nn.functional.cross_entropy(steps_of[name](x), target)
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)

        for name in models:  # warm-up (and compilation), then peak memory of one step
            for _ in range(warmup):
                step(name)
            if device.startswith('cuda'):
                _sync(device)
                torch.cuda.reset_peak_memory_stats()
                step(name)
                _sync(device)
                peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30
        for _ in range(steps):  # interleaved: drift and clocks hit every model alike
            for name in models:
                _sync(device)
                t0 = time.perf_counter()
                step(name)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        base_t = statistics.median(times[baseline])
        for name in models:
            t = statistics.median(times[name])
            mem = peak.get(name, math.nan)
            base_m = peak.get(baseline, math.nan)
            rows.append(f'| `{name}` | {"yes" if compiled else "no"} | {batch / t:.0f} | {t / base_t:.2f} | '
                        f'{mem:.2f} | {mem / base_m:.2f} |')
        del models, opts, steps_of
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
    rows.append(f'\nbatch {batch}, {size}², SGD momentum, autocast {str(amp_dtype).split(".")[1]}, channels_last, '
                f'median of {steps} interleaved steps after {warmup} warm-up steps')
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--quick', action='store_true', help='tiny sizes and fewer models: checks the script, not the GPU')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    p.add_argument('--official-kcla', default=None, help='checkout of github.com/bgx666/KCLA')
    p.add_argument('--official-mrla', default=None, help='checkout of github.com/joyfang1106/MRLA')
    p.add_argument('--out', default=None, help='also write the report (markdown) to this file')
    args = p.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print('no CUDA device: use --device cpu --quick to check the script itself', file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'CPU'
    report = [f'## GPU check, {datetime.date.today().isoformat()}: {device_name}',
              f'torch {torch.__version__}, timm {timm.__version__}, timm-layerattn {timm_layerattn.__version__}', '']
    t0 = time.perf_counter()
    rows, ok_correct = check_correctness(args.device, args.quick)
    report += ['### Correctness: device vs CPU, float32 eval logits (TF32 off; pass ≤ 1e-4)', *rows, '']
    print('\n'.join(report), flush=True)
    rows, ok_numerics = check_numerics(args.device, args.quick)
    part = ['### AMP numerics: train-mode forward + backward, outputs and gradients finite', *rows, '']
    print('\n'.join(part), flush=True)
    report += part
    modes = (False,) if args.no_compile else (False, True)
    part = ['### Training step: throughput and peak memory vs timm resnet50 (same process, interleaved)',
            *measure_training(args.device, args.quick, args.official_kcla, args.official_mrla, modes), '']
    print('\n'.join(part), flush=True)
    report += part
    for base, names in TRUNK_SPEED[:1] if args.quick else TRUNK_SPEED:
        def models_of(plain: bool, base=base, names=names) -> Dict[str, Callable[[], nn.Module]]:
            out = {n: (lambda n=n: timm.create_model(n)) for n in [base, *names]}
            if plain:
                out.update({n + PLAIN: (lambda n=n: WithPlainAutograd(timm.create_model(n))) for n in names})
            return out
        part = [f'### Training step vs timm {base} (same process, interleaved)',
                *measure_training(args.device, args.quick, None, None, (False,), base, models_of), '']
        print('\n'.join(part), flush=True)
        report += part
    report.append(f'total {time.perf_counter() - t0:.0f} s')
    print(report[-1])
    if args.out:
        Path(args.out).write_text('\n'.join(report) + '\n', encoding='utf-8')
    return 0 if ok_correct and ok_numerics else 1


if __name__ == '__main__':
    sys.exit(main())
