"""Cost of attention shortcuts (docs/design/attention_shortcuts.md#as-cost): parameters, MACs, CPU inference time,
per-site growth of the attention cost and K/V cache with depth (paper Eq 3.3), training memory.

    python benchmarks/bench_attention_shortcuts.py [--reps 7] [--batch 8] [--no-imagenet]

* Params and GMACs (`timm_layerattn.tools.zoo.count_macs`: convs and matmuls) per model, CIFAR stem at
  32x32 and ImageNet stem at 224x224. The per-pixel core attention (QK and AV, 2 n c HW MACs per site) is
  elementwise multiply-reduce in the CPU kernel, which FlopCounterMode does not see; it is listed apart.
* CPU inference time (torch.set_num_threads(2)), models interleaved within each repetition, median over
  the repetitions, as a ratio to `cifar_resnet50` measured in the same run.
* Per site: entries n, width c, resolution, core MACs (QK^T + AV), projection MACs (W^Q, W^O and the newest
  entry's W^K, W^V), cache-adapter MACs, and the cache size (K + V floats), recorded from a real forward.
* Depth sweep: AS_out with more stage-3 blocks, showing the core term's L^2 growth against the linear rest.
* Training memory: bytes autograd saves for backward (saved_tensors_hooks, shared storages counted once):
  activations per image (batch 2, parameters excluded), and at batch 1 including the weights autograd
  saves (how the table at docs/design/attention_shortcuts.md#as-cost-growth counts).
"""
import argparse
import statistics
import time
from dataclasses import replace
from typing import Dict, List, Tuple

import timm
import torch

import timm_layerattn  # noqa: F401  (registers the models)
from timm_layerattn.layers.shortcut import AttentionShortcut
from timm_layerattn.models.resnet_as import as_arch
from timm_layerattn.models.resnet_trunk import ResNetLA
from timm_layerattn.tools.zoo import count_macs, count_params

CIFAR = ['cifar_resnet50', 'cifar_resnet50_as_out', 'cifar_resnet50_as_kv', 'cifar_resnet50_as_stages',
         'cifar_resnet50_half', 'cifar_resnet50_plain']
IMAGENET = ['resnet50_as_out', 'resnet50_as_kv', 'resnet50_as_stages', 'resnet50_half', 'resnet50_plain']


def site_costs(model: torch.nn.Module, size: Tuple[int, int]) -> List[Dict]:
    """Run one forward and record, per attention site, the quantities of
    docs/design/attention_shortcuts.md#as-cost-growth (batch 1)."""
    rows = []
    orig = AttentionShortcut.update_cache

    def recording(self, state, k, v):
        cache = orig(self, state, k, v)
        n, c, h, w = cache[0].shape[1:]
        hw = h * w
        adapters = 0
        if self.kv_adapt_k is not None or self.kv_adapt is not None:
            c_prev = state[0].shape[2]
            adapters = 2 * (n - 1) * c_prev * c * hw
        proj = (3 + int(self.has_query)) * c * c * hw  # W^K, W^V (newest entry), W^O, W^Q if any
        rows.append(dict(n=n, c=c, hw=(h, w), core=2 * n * c * hw if n > 1 else 0, proj=proj, adapters=adapters,
                         cache=2 * n * c * hw))
        return cache

    AttentionShortcut.update_cache = recording
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *size))
    finally:
        AttentionShortcut.update_cache = orig
    return rows


def core_macs(model: torch.nn.Module, size: Tuple[int, int]) -> int:
    return sum(r['core'] for r in site_costs(model, size))


def saved_bytes(model: torch.nn.Module, size: Tuple[int, int], batch: int = 2, weights: bool = False) -> float:
    """Bytes autograd keeps for backward of a train-mode forward, per image (`weights`: also the parameters
    autograd saves, e.g. conv weights; the memory table at
    docs/design/attention_shortcuts.md#as-cost-growth counts those, at batch 1)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if weights or storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 3, *size))
    return sum(seen.values()) / batch


def time_models(models: Dict[str, torch.nn.Module], size: Tuple[int, int], batch: int, reps: int) -> Dict[str, float]:
    """Median seconds per forward; models interleaved within each repetition (drift hits all alike)."""
    x = torch.randn(batch, 3, *size)
    times: Dict[str, List[float]] = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()(x)  # warm-up
        for _ in range(reps):
            for name, m in models.items():
                t = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t)
    return {n: statistics.median(t) for n, t in times.items()}


def print_sites(name: str, rows: List[Dict]) -> None:
    print(f'\n{name}: per site (batch 1)')
    print(f'{"site":>4} {"n":>3} {"c":>5} {"HxW":>7} {"core MMAC":>10} {"core/(c HW)":>11} {"proj MMAC":>10} '
          f'{"adapt MMAC":>10} {"cache kfl":>10}')
    for i, r in enumerate(rows, start=1):
        h, w = r['hw']
        print(f'{i:>4} {r["n"]:>3} {r["c"]:>5} {f"{h}x{w}":>7} {r["core"] / 1e6:>10.2f} '
              f'{r["core"] / (r["c"] * h * w):>11.0f} {r["proj"] / 1e6:>10.1f} {r["adapters"] / 1e6:>10.1f} '
              f'{r["cache"] / 1e3:>10.0f}')
    tot = {k: sum(r[k] for r in rows) for k in ('core', 'proj', 'adapters')}
    print(f'{"total":>4} {"":>3} {"":>5} {"":>7} {tot["core"] / 1e6:>10.2f} {"":>11} {tot["proj"] / 1e6:>10.1f} '
          f'{tot["adapters"] / 1e6:>10.1f} {max(r["cache"] for r in rows) / 1e3:>10.0f} (peak)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--reps', type=int, default=7, help='timing repetitions (median; >= 5)')
    parser.add_argument('--batch', type=int, default=8, help='batch size for the CIFAR timings')
    parser.add_argument('--no-imagenet', action='store_true', help='skip the 224x224 ImageNet-stem rows')
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}')
    groups = [('CIFAR stem, 32x32, 10 classes', CIFAR, (32, 32), args.batch, 'cifar_resnet50')]
    if not args.no_imagenet:
        groups.append(('ImageNet stem, 224x224, 1000 classes', ['resnet50'] + IMAGENET, (224, 224), 1, 'resnet50'))
    for title, names, size, batch, base in groups:
        models = {n: timm.create_model(n) for n in names}
        secs = time_models(models, size, batch, args.reps)
        print(f'\n## {title} (time: batch {batch}, median of {args.reps} interleaved runs, ratio to {base})')
        print(f'{"model":<26} {"params":>12} {"GMACs":>7} {"core MMAC":>10} {"ms/batch":>9} {"time ratio":>10} '
              f'{"act MiB/img":>11} {"+weights MiB":>12}')
        for n, m in models.items():
            core = core_macs(m, size) if any(isinstance(x, AttentionShortcut) for x in m.modules()) else 0
            print(f'{n:<26} {count_params(m):>12,} {count_macs(m, (3, *size), device="cpu") / 1e9:>7.3f} '
                  f'{core / 1e6:>10.2f} {secs[n] * 1e3:>9.1f} {secs[n] / secs[base]:>10.2f} '
                  f'{saved_bytes(m, size) / 2 ** 20:>11.1f} {saved_bytes(m, size, 1, weights=True) / 2 ** 20:>12.1f}')
        for n in names:
            if '_as_' in n:
                print_sites(f'{n} at {size[0]}x{size[1]}', site_costs(models[n], size))

    print('\n## Depth sweep (Eq 3.3): AS_out, CIFAR stem, 32x32, stage-3 depth varied')
    print(f'{"depths":<14} {"sites":>5} {"core MMAC":>10} {"core/sites":>10} {"proj MMAC":>10} {"GMACs":>7}')
    for d3 in (6, 12, 23, 46):
        cfg = replace(as_arch('as_out', stem_type='cifar'), layers=(3, 4, d3, 3))
        m = ResNetLA(cfg, num_classes=10)
        rows = site_costs(m, (32, 32))
        core, proj = sum(r['core'] for r in rows), sum(r['proj'] for r in rows)
        print(f'{str(cfg.layers):<14} {len(rows):>5} {core / 1e6:>10.2f} {core / len(rows) / 1e6:>10.3f} '
              f'{proj / 1e6:>10.1f} {count_macs(m, (3, 32, 32), device="cpu") / 1e9:>7.3f}')


if __name__ == '__main__':
    main()
