"""Small shared utilities: user-facing errors and atomic file output."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ['UserError', 'atomic_dir', 'atomic_file', 'cache_dir']

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """The package's cache: `$TIMM_LAYERATTN_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/timm-layerattn`.

    Same rule as the standalone `det/install_mmcv.py`, which keeps its own copy (it runs before the
    package is installed).
    """
    explicit = os.environ.get('TIMM_LAYERATTN_CACHE')
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache').expanduser() / 'timm-layerattn'


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


@contextlib.contextmanager
def atomic_dir(dest: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `dest` only if the block completes.

    On any exception the temporary folder is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f'output folder already exists: {dest} (remove it or pass --overwrite)')
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{dest.name}.', suffix='.tmp', dir=dest.parent))
    try:
        yield tmp
        # mkdtemp / mkstemp create private (0700 / 0600) entries; give the result the usual permissions
        mask = _umask()
        for path in (tmp, *tmp.rglob('*')):
            if path.is_dir():
                path.chmod(0o777 & ~mask)
            elif path.stat().st_mode & 0o777 == 0o600:
                path.chmod(0o666 & ~mask)
        if dest.exists():
            old = dest.with_name(f'.{dest.name}.old')
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(dest: PathLike, mode: str = 'wb') -> Iterator:
    """Open a temporary sibling of `dest` for writing; rename it over `dest` on success only."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{dest.name}.', suffix='.tmp', dir=dest.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
