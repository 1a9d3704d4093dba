"""`timm-layerattn kernels`: build the fused CPU kernels now (they are otherwise built on first use)."""
import argparse
import time

__all__ = ['add_arguments', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--quiet', action='store_true', help='print nothing; the exit status tells (0: usable)')


def run(args: argparse.Namespace) -> int:
    from ..layers import native
    if native.mode() == 'off':
        if not args.quiet:
            print(f'fused CPU kernels: off ({native.ENV}=0)')
        return 1
    t0 = time.perf_counter()
    try:
        path = native.build()
    except native.NativeKernelError as e:
        if not args.quiet:
            print(f'fused CPU kernels: unavailable: {e}')
        return 1
    ok = native.available()
    if not args.quiet:
        state = 'ready' if ok else f'built but not loadable: {native.last_error()}'
        print(f'fused CPU kernels: {state} ({path}, {time.perf_counter() - t0:.1f} s)')
    return 0 if ok else 1
