"""ResNet-50 variants vs timm `resnet50` (and vs the official implementations, when checkouts are given).

    python benchmarks/bench_resnet50.py                               # ours only
    python benchmarks/bench_resnet50.py --official-kcla /tmp/official/KCLA --official-mrla /tmp/official/MRLA
    python benchmarks/bench_resnet50.py --channels-last
    python benchmarks/bench_resnet50.py --pytorch-ops                 # + our models without the fused CPU kernels
    python benchmarks/bench_resnet50.py --plain-autograd              # + our models training with plain autograd

Prints params, GMACs, inference and training-step time and training activation memory, each as a ratio
to timm's `resnet50` measured in the same run (models interleaved, median of the repeats), plus each of
our models' speed relative to the official implementation of the same model. Training rows time a forward +
backward + SGD step on the memory-lean training path; activation memory is what autograd keeps for backward. The official code is never
part of this repository: `benchmarks/official.py` loads it from a local checkout.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timm_layerattn.tools.bench import (  # noqa: E402
    PLAIN_AUTOGRAD_SUFFIX, PYTORCH_OPS_SUFFIX, BenchConfig, benchmark, format_results, timm_factory)

OURS = {'resnet50_kcla': 'KCLA', 'resnet50_mrlal': 'MRLA-L', 'resnet50_mrlab': 'MRLA-B'}


def official_factory(name: str, kcla_repo: str, mrla_repo: str, **kwargs):
    def make():
        from official import load_official
        return load_official(name, kcla_repo=kcla_repo, mrla_repo=mrla_repo, **kwargs)
    return make


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--official-kcla', default=None, help='checkout of github.com/bgx666/KCLA')
    p.add_argument('--official-mrla', default=None, help='checkout of github.com/joyfang1106/MRLA')
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
    args = p.parse_args()

    cfg = BenchConfig(
        batch_size=args.batch_size, img_size=args.img_size, threads=args.threads, repeats=args.repeats,
        train=not args.no_train, train_repeats=args.train_repeats, channels_last=args.channels_last,
        device=args.device, amp=args.amp, compile=args.compile, steady_malloc=args.steady_malloc)
    factories = {'resnet50': timm_factory('resnet50')}
    factories.update({n: timm_factory(n) for n in OURS})
    if args.pytorch_ops:
        factories.update({n + PYTORCH_OPS_SUFFIX: timm_factory(n, pytorch_ops=True) for n in OURS})
    if args.plain_autograd:
        factories.update({n + PLAIN_AUTOGRAD_SUFFIX: timm_factory(n, plain_autograd=True) for n in OURS})
    pairs = {}
    if args.official_kcla and not args.channels_last:  # its 5-D norm_d parameter cannot be made channels_last
        # head dim 32: the paper's setting and our default (the released code defaults to 64)
        factories['official_resnet50_kcla'] = official_factory(
            'resnet50_kcla', args.official_kcla, args.official_mrla, head_dim=32)
        pairs['resnet50_kcla'] = 'official_resnet50_kcla'
    if args.official_mrla:
        for n in ('resnet50_mrlal', 'resnet50_mrlab'):
            factories[f'official_{n}'] = official_factory(n, args.official_kcla, args.official_mrla)
            pairs[n] = f'official_{n}'
    results = benchmark(factories, cfg, baseline='resnet50')
    print(format_results(results, cfg, 'resnet50'))
    by_name = {r.name: r for r in results}
    for ours, official in pairs.items():
        o, r = by_name[ours], by_name[official]
        line = f'{OURS[ours]:<7} ours vs official: inference {o.infer_ms / r.infer_ms:.2f}x'
        plain = by_name.get(ours + PYTORCH_OPS_SUFFIX)
        if plain is not None:
            line += f' ({plain.infer_ms / r.infer_ms:.2f}x with PyTorch ops only)'
        if cfg.train:
            line += f', train step {o.train_ms / r.train_ms:.2f}x, activation memory {o.act_mb / r.act_mb:.2f}x'
        print(line + ' (lower is better)')


if __name__ == '__main__':
    main()
