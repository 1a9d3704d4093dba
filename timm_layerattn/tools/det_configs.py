"""`timm-layerattn det-configs`: where the MMDetection configs are, or a copy of them.

The configs live in the repository's top-level `mmdet_configs/` and are installed with the package as
`timm_layerattn/det/configs/` (a link to that folder in a checkout), so stock MMDetection tools can be
pointed at them from a wheel install too. Works without MMDetection installed.

What the configs share is in `_base_/` next to them (`_base_/layer_attn_backbone.py`, the backbone and its
recipe), which every R50 config lists in its `_base_`; a copy carries that folder along.
"""
import argparse
import fnmatch
import os
import shutil
from pathlib import Path
from typing import List, Set

from .._utils.errors import UserError
from .._utils.files import atomic_dir

__all__ = ['config_dir', 'list_configs', 'base_fragments', 'is_config_copy']

COPY_KIND = 'a copy of the MMDetection configs (the shipped config files and their _base_/, nothing else)'
# The folder of the fragments the configs inherit, next to them.
BASE_DIR = '_base_'


def config_dir() -> Path:
    """Folder holding the shipped MMDetection configs."""
    path = Path(__file__).resolve().parents[1] / 'det' / 'configs'
    if not path.is_dir():
        raise UserError(f'MMDetection configs not found at {path}; reinstall timm-layerattn')
    return path


def list_configs(pattern: str = '*') -> List[str]:
    """Names of the shipped configs matching a wildcard pattern."""
    return sorted(p.name for p in config_dir().glob('*.py') if fnmatch.fnmatch(p.name, pattern))


def base_fragments() -> List[str]:
    """Names of the shared fragments in `_base_/`, which the configs inherit (not configs of their own)."""
    return sorted(p.name for p in (config_dir() / BASE_DIR).glob('*.py'))


def _only_files_named(folder: Path, names: Set[str]) -> bool:
    return all(p.name in names and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def is_config_copy(folder: Path) -> bool:
    """Whether `folder` is an earlier `--copy` (only files named like the shipped configs, and their `_base_/`
    with the shipped fragments), which `--overwrite` may replace; a folder with anything else in it is the
    user's and never is."""
    folder = Path(folder)
    base = folder / BASE_DIR
    try:
        if os.path.lexists(base):
            if base.is_symlink() or not base.is_dir() or not _only_files_named(base, set(base_fragments())):
                return False
        names = set(list_configs()) | {BASE_DIR}
        return all(p.name in names and (p.name == BASE_DIR or (p.is_file() and not p.is_symlink()))
                   for p in folder.iterdir())
    except OSError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('pattern', nargs='?', default=None,
                        help='wildcard on config names: print the paths of the matching configs')
    parser.add_argument('--copy', metavar='DIR', default=None,
                        help='copy all configs into the new folder DIR (e.g. to edit them; R101 configs '
                             'inherit from the R50 ones next to them, and those from _base_/)')
    parser.add_argument('--overwrite', action='store_true',
                        help='with --copy: replace an existing DIR if it is an earlier copy (never another folder)')


def run(args: argparse.Namespace) -> int:
    folder = config_dir()
    if args.copy:
        if args.pattern:
            raise UserError('--copy copies every config (they inherit from each other); drop the pattern')
        names, fragments = list_configs(), base_fragments()
        with atomic_dir(args.copy, overwrite=args.overwrite, is_ours=is_config_copy, kind=COPY_KIND) as tmp:
            for name in names:
                shutil.copyfile(folder / name, tmp / name)
            (tmp / BASE_DIR).mkdir()
            for name in fragments:
                shutil.copyfile(folder / BASE_DIR / name, tmp / BASE_DIR / name)
        print(f'copied {len(names)} configs (and the {BASE_DIR}/ they inherit) to {args.copy}')
    elif args.pattern:
        names = list_configs(args.pattern)
        if not names:
            raise UserError(f'no config matches {args.pattern!r}; available: {", ".join(list_configs())}')
        for name in names:
            print(folder / name)
    else:
        print(folder)
    return 0
