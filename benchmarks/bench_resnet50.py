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

from _same_run import add_timing_arguments, bench_config, our_factories, vs_official_lines  # noqa: E402
from timm_layerattn.tools.bench import benchmark, format_results  # noqa: E402

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
    add_timing_arguments(p)
    args = p.parse_args()

    cfg = bench_config(args)
    factories = our_factories('resnet50', OURS, args)
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
    print('\n'.join(vs_official_lines(results, pairs, cfg, {n: f'{lab:<7} ours' for n, lab in OURS.items()})))

if __name__ == '__main__':
    main()
