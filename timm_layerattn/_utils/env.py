"""What the environment configures: the cache folder and on/off switches.

Standard library only and no package imports: `scripts/install_mmcv.py` restates `cache_dir`'s rule (it runs
before the package is installed) and its test loads this file by path to check that both agree. (The one
exception, `UserError` as a base of `EnvSwitchError`, is optional: loaded by path the error is a `ValueError`.)
"""
import os
from pathlib import Path
from typing import Tuple

try:  # inside the package: the CLI reports a UserError as one line
    from .errors import UserError
    _BASES: Tuple[type, ...] = (UserError, ValueError)
except ImportError:  # loaded by path, without its package
    _BASES = (ValueError,)

__all__ = ['cache_dir', 'env_switch', 'accepted_values', 'EnvSwitchError', 'SWITCH_VALUES']

# The values an on/off switch accepts (case and surrounding blanks ignored); unset or empty means 'auto'.
SWITCH_VALUES = {'off': ('0', 'off', 'false', 'no'), 'on': ('1', 'on', 'true', 'yes'), 'auto': ('auto',)}


class EnvSwitchError(*_BASES):  # type: ignore[misc]
    """An on/off environment switch holds a value it does not accept."""


def cache_dir() -> Path:
    """The package's cache: `$TIMM_LAYERATTN_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/timm-layerattn`.

    Same rule as the standalone `scripts/install_mmcv.py` (its `default_cache_dir`), which keeps its own copy.
    """
    explicit = os.environ.get('TIMM_LAYERATTN_CACHE')
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache').expanduser() / 'timm-layerattn'


def accepted_values() -> Tuple[str, ...]:
    """Every value an on/off switch accepts, in the order of `SWITCH_VALUES`."""
    return tuple(v for values in SWITCH_VALUES.values() for v in values)


def env_switch(name: str) -> str:
    """'off', 'on' or 'auto' from an on/off environment variable: 0/off/false/no, 1/on/true/yes, auto; unset or
    empty is 'auto'. Any other value (`disabled`, `2`) raises `EnvSwitchError` naming the variable and the
    accepted values, rather than being taken silently as 'auto'."""
    raw = os.environ.get(name, '')
    value = raw.strip().lower()
    if not value:
        return 'auto'
    for result, values in SWITCH_VALUES.items():
        if value in values:
            return result
    raise EnvSwitchError(f'{name}={raw!r} is not an accepted value; use one of {", ".join(accepted_values())} '
                         f'(or leave it unset for auto)')
