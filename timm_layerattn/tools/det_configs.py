"""`timm-layerattn det-configs`: where the MMDetection configs are, or a copy of them.

The configs live in the repository's top-level `mmdet_configs/` and are installed with the package as
`timm_layerattn/det/configs/` (a link to that folder in a checkout), so stock MMDetection tools can be
pointed at them from a wheel install too. Works without MMDetection installed.
"""
import argparse
import fnmatch
import shutil
from pathlib import Path
from typing import List

from .._utils.errors import UserError
from .._utils.files import atomic_dir

__all__ = ['config_dir', 'list_configs', 'is_config_copy']

COPY_KIND = 'a copy of the MMDetection configs (nothing but config files with the shipped names)'


def config_dir() -> Path:
    """Folder holding the shipped MMDetection configs."""
    path = Path(__file__).resolve().parents[1] / 'det' / 'configs'
    if not path.is_dir():
        raise UserError(f'MMDetection configs not found at {path}; reinstall timm-layerattn')
    return path


def list_configs(pattern: str = '*') -> List[str]:
    """Names of the shipped configs matching a wildcard pattern."""
    return sorted(p.name for p in config_dir().glob('*.py') if fnmatch.fnmatch(p.name, pattern))


def is_config_copy(folder: Path) -> bool:
    """Whether `folder` is an earlier `--copy` (only files named like the shipped configs), which `--overwrite`
    may replace; a folder with anything else in it is the user's and never is."""
    names = set(list_configs())
    try:
        return all(p.name in names and p.is_file() and not p.is_symlink() for p in folder.iterdir())
    except OSError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pattern', nargs='?', default=None,
                        help='wildcard on config names: print the paths of the matching configs')
    parser.add_argument('--copy', metavar='DIR', default=None,
                        help='copy all configs into the new folder DIR (e.g. to edit them; R101 configs '
                             'inherit from the R50 ones next to them)')
    parser.add_argument('--overwrite', action='store_true',
                        help='with --copy: replace an existing DIR if it is an earlier copy (never another folder)')


def run(args: argparse.Namespace) -> int:
    folder = config_dir()
    if args.copy:
        if args.pattern:
            raise UserError('--copy copies every config (they inherit from each other); drop the pattern')
        names = list_configs()
        with atomic_dir(args.copy, overwrite=args.overwrite, is_ours=is_config_copy, kind=COPY_KIND) as tmp:
            for name in names:
                shutil.copyfile(folder / name, tmp / name)
        print(f'copied {len(names)} configs to {args.copy}')
    elif args.pattern:
        names = list_configs(args.pattern)
        if not names:
            raise UserError(f'no config matches {args.pattern!r}; available: {", ".join(list_configs())}')
        for name in names:
            print(folder / name)
    else:
        print(folder)
    return 0
