"""`timm-layerattn` command line. Each subcommand lives in its own module, imported only when used.

A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
Errors caused by user input (`UserError`) print as a single line and exit with status 2.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from ._utils import UserError
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
    'kernels': ('timm_layerattn.tools.kernels', 'build the fused CPU inference kernels now and say where they are'),
}


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """Top-level parser; only the arguments of `command` (if given) are built, keeping startup light."""
    parser = argparse.ArgumentParser(prog='timm-layerattn', description=__doc__.splitlines()[0])
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except UserError as e:
        print(f'timm-layerattn {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
