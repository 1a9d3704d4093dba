"""What the environment configures: the cache folder and on/off switches.

Standard library only and no package imports: `scripts/install_mmcv.py` restates `cache_dir`'s rule (it runs
before the package is installed) and its test loads this file by path to check that both agree.
"""
import os
from pathlib import Path

__all__ = ['cache_dir', 'env_switch']


def cache_dir() -> Path:
    """The package's cache: `$TIMM_LAYERATTN_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/timm-layerattn`.

    Same rule as the standalone `scripts/install_mmcv.py` (its `default_cache_dir`), which keeps its own copy.
    """
    explicit = os.environ.get('TIMM_LAYERATTN_CACHE')
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache').expanduser() / 'timm-layerattn'


def env_switch(name: str) -> str:
    """'off', 'on' or 'auto' from an on/off environment variable (0/off/false/no, 1/on/true/yes, else 'auto')."""
    value = os.environ.get(name, '').strip().lower()
    if value in ('0', 'off', 'false', 'no'):
        return 'off'
    if value in ('1', 'on', 'true', 'yes'):
        return 'on'
    return 'auto'
