"""`timm-layerattn` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
Errors caused by user input (`UserError`, and the errors that bad paths, model arguments or model names
raise, see `user_error_message`) print as a single line and exit with status 2. Anything else is a bug:
one line and status 1, or the full traceback with the global `--debug` flag.
"""
import argparse
import importlib
import sys
import traceback
from typing import Callable, List, Optional

from ._utils.errors import Terminated, UserError, first_line
from .version import __version__

# name -> (module, one-line help)
COMMANDS = {
    'list': ('timm_layerattn.tools.zoo', 'table of registered models: params, GMACs'),
    'demo': ('timm_layerattn.demo', 'the main job: train, compare, export, reload on embedded digits (CPU, minutes)'),
    'train': ('timm_layerattn.train', 'train with the papers\' recipes on timm\'s training parts (torchrun for DDP)'),
    'bench': ('timm_layerattn.tools.bench', 'CPU/GPU speed of the ResNet-50 variants relative to timm resnet50'),
    'export': ('timm_layerattn.tools.export', 'checkpoint -> Hub-ready folder (model.safetensors, config.json, card)'),
    'push': ('timm_layerattn.tools.push', 'upload an exported folder to a Hugging Face Hub model repo'),
    'convert': ('timm_layerattn.convert', 'official KCLA / MRLA / CNNtention checkpoint -> this package (safetensors)'),
    'det-configs': ('timm_layerattn.tools.det_configs', 'path of the MMDetection configs, or a copy of them'),
    'det-smoke': ('timm_layerattn.tools.det_smoke', 'smoke test of a detection config: 2 iters + COCO eval, tiny data'),
    'kernels': ('timm_layerattn.tools.kernels', 'build the fused CPU inference kernels now and say where they are'),
    'reproduce': ('timm_layerattn.tools.reproduce', 'rerun a paper\'s table (models x depths x seeds): mean +- SD'),
}


def user_error_message(e: BaseException) -> Optional[str]:
    """The one-line message of an error caused by the user's input or environment, None for a bug.

    Expected: `UserError` (every checked input, checkpoint errors included), an `OSError` from the file
    system (permission denied, read-only, a file where a folder should be, disk full) or the network /
    Hub (a `local-dir:` or `hf-hub:` name that does not resolve, no connection), timm's
    `Unknown model` error (e.g. a `local-dir:` folder naming an architecture nobody registered) and
    running out of memory. A `ValueError` / `TypeError` is expected only where the code says so, by
    turning it into a `UserError` at the boundary (model constructors): elsewhere it is a bug.
    """
    if isinstance(e, UserError):
        return first_line(e)
    if isinstance(e, OSError):  # includes the Hub's and the network's errors (huggingface_hub, requests)
        where = ' -> '.join(str(f) for f in (e.filename, e.filename2) if f is not None)
        reason = e.strerror or first_line(e)
        return f'{reason}: {where}' if where else reason
    if isinstance(e, RuntimeError) and str(e).startswith('Unknown model'):
        return first_line(e) + '; see `timm-layerattn list`'
    if isinstance(e, MemoryError) or type(e).__name__ == 'OutOfMemoryError':
        return f'out of memory ({first_line(e)}); try a smaller --batch-size or input size'
    return None


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """Top-level parser; only the arguments of `command` (if given) are built, keeping startup light."""
    parser = argparse.ArgumentParser(prog='timm-layerattn', description=__doc__.splitlines()[0])
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('--debug', action='store_true', help='show the full traceback of any error')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
            # also accepted after the command; SUPPRESS keeps the global value when it is not given here
            p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _command_of(argv: List[str]) -> Optional[str]:
    """The subcommand: the first argument that is not a global option."""
    for a in argv:
        if not a.startswith('-'):
            return a if a in COMMANDS else None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 1
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_reporting_errors(f'timm-layerattn {args.command}', lambda: module.run(args), debug=args.debug)


def run_reporting_errors(prog: str, fn: Callable[[], Optional[int]], debug: bool = False) -> int:
    """Run `fn` and turn what it raises into an exit status and one line on stderr.

    User errors (`user_error_message`): 2; bugs: 1, with the traceback only if `debug`; Ctrl-C: 130;
    SIGTERM inside an atomic output (`Terminated`): 143.
    """
    try:
        return fn() or 0
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except Terminated as e:
        import signal
        print(f'{prog}: terminated by {signal.Signals(e.signum).name}; its temporary output was removed',
              file=sys.stderr)
        return e.code
    except Exception as e:
        message = user_error_message(e)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f'{prog}: error: {message}', file=sys.stderr)
            return 2
        hint = '' if debug else ' (a bug, not your input; run with --debug for the traceback)'
        print(f'{prog}: internal error: {type(e).__name__}: {first_line(e)}{hint}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
