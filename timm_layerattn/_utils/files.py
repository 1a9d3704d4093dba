"""Files and folders the package writes: atomic output, output markers, writability checks.

Atomic output never loses a file: a folder or file is written under a temporary sibling name and renamed
into place only when complete; an existing folder is replaced only when the caller recognises it as one
of its own outputs (and `overwrite` is given), never a regular file or a user's other folder. Temporary
siblings carry the writer's pid, so the next run removes those of runs that were killed (`kill -9`),
and SIGTERM is turned into an exception while one is open, so its cleanup runs.
"""
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from ..version import __version__
from .errors import Terminated, UserError

__all__ = ['atomic_dir', 'atomic_file', 'check_output_dir', 'check_writable', 'output_marker', 'read_marker',
           'MARKER_KEY', 'write_error', 'path_problem']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def path_problem(path: PathLike, want: str = 'file') -> Optional[str]:
    """Why `path` cannot be read as a `want` ('file' or 'folder'), in words, or None when it can.

    'not found' only when nothing is there; a symbolic link loop, a dangling link, a folder given for a file,
    a file given for a folder, a FIFO, a socket or a device each get their own words.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f'is a symbolic link to a missing target ({os.readlink(path)})'
        return 'not found'
    except OSError as e:
        if e.errno == errno.ELOOP:
            return 'is a symbolic link loop'
        if e.errno == errno.ENOTDIR:
            return 'not found (a part of the path is a file, not a folder)'
        return f'cannot be read ({e.strerror or e})'
    mode = st.st_mode
    if want == 'file' and stat.S_ISREG(mode) or want == 'folder' and stat.S_ISDIR(mode):
        return None
    kind = ('a folder' if stat.S_ISDIR(mode) else 'a FIFO (named pipe)' if stat.S_ISFIFO(mode)
            else 'a socket' if stat.S_ISSOCK(mode) else 'a device' if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else 'a file' if stat.S_ISREG(mode) else 'not a regular file')
    return f'is {kind}, not a {want}'


# A serializer's message that carries the OS error (safetensors: "... (os error 28)") or a torch writer failure.
_OS_ERROR_IN_MESSAGE = re.compile(r'\(os error (\d+)\)|\[Errno (\d+)\]')
_TORCH_WRITE_FAILED = ('inline_container.cc', 'PytorchStreamWriter failed', 'file write failed')
# Below this much free space a failed write is taken for a full disk.
_NEARLY_FULL = 64 << 20


def write_error(e: BaseException, dest: PathLike) -> Optional[OSError]:
    """The `OSError` behind a failure to write `dest`, or None when `e` is not one.

    Serializers hide the OS error: safetensors raises `SafetensorError('... No space left on device (os error
    28)')`, torch `RuntimeError('[enforce fail at inline_container.cc] unexpected pos ...')`. Those (and an
    `OSError` without a file name) become an `OSError` naming `dest`, which the command line reports as one
    line (a full disk is the user's environment, not a bug). Call it before the partial output is removed: a
    torch failure is called a full disk when the disk is (nearly) full.
    """
    if isinstance(e, OSError):
        if e.filename is None and e.errno is not None:
            return OSError(e.errno, e.strerror or os.strerror(e.errno), str(dest))
        return None
    text = str(e)
    found = _OS_ERROR_IN_MESSAGE.search(text)
    if found:
        code = int(found.group(1) or found.group(2))
        return OSError(code, os.strerror(code), str(dest))
    if isinstance(e, RuntimeError) and any(t in text for t in _TORCH_WRITE_FAILED):
        try:
            free = shutil.disk_usage(_nearest_existing(Path(dest).absolute().parent)).free
        except OSError:
            free = None
        if free is not None and free < _NEARLY_FULL:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return OSError(errno.EIO, f'writing failed ({first[:120]})', str(dest))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Output markers: how a folder says it was written by this package (and may be replaced with --overwrite)
# ---------------------------------------------------------------------------------------------------------------

# Key of the marker entry in a JSON file an output folder holds anyway (an export's config.json, a demo's
# demo.json), so the folders hold exactly the files their users expect and nothing else.
MARKER_KEY = 'timm_layerattn'


def output_marker(kind: str, **extra: Any) -> Dict[str, Any]:
    """The marker entry (`{MARKER_KEY: ...}` value) of an output of `kind` ('export', 'demo')."""
    return {'version': __version__, 'kind': kind, **extra}


def read_marker(path: PathLike) -> Optional[Dict[str, Any]]:
    """The marker entry of the JSON file `path`, None if it is missing, unreadable or has none."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > 100 << 20:
            return None
        obj = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    entry = obj.get(MARKER_KEY) if isinstance(obj, dict) else None
    return entry if isinstance(entry, dict) and 'version' in entry else None


# ---------------------------------------------------------------------------------------------------------------
# Output checks
# ---------------------------------------------------------------------------------------------------------------

def _nearest_existing(path: Path) -> Path:
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_creatable(path: Path, what: str) -> None:
    """Raise `UserError` unless `path` (absent) could be created: its nearest existing ancestor is a writable folder."""
    probe = _nearest_existing(path.parent)
    if not probe.is_dir():
        raise UserError(f'{what} {path} cannot be created: {probe} is not a folder')
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f'{what} {path} cannot be created: {probe} is not writable ({e.strerror or e})') from None


def check_writable(path: PathLike, what: str = 'output folder') -> None:
    """Raise `UserError` unless folder `path` exists as a folder or can be created; creates nothing lasting."""
    path = Path(path).absolute()
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f'{what} {path} exists and is not a folder')
    if path.is_dir():
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise UserError(f'{what} {path} is not writable ({e.strerror or e})') from None
    else:
        _check_creatable(path, what)


def check_output_dir(
        dest: PathLike,
        overwrite: bool = False,
        is_ours: Optional[Callable[[Path], bool]] = None,
        kind: str = 'an output folder of timm_layerattn',
        what: str = 'output folder',
) -> None:
    """Raise `UserError` unless `atomic_dir(dest, overwrite, is_ours)` may write `dest`.

    Replaceable with `overwrite`: an empty folder, or one that `is_ours` recognises as an earlier output of
    the same kind. Never replaced: a regular file, a symbolic link, any other folder.
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise UserError(f'{what} {dest} is a symbolic link; it is never replaced (remove it or choose another path)')
    if dest.exists():
        if not dest.is_dir():
            raise UserError(f'{what} {dest} exists and is not a folder; it is never replaced '
                            f'(remove it or choose another path)')
        if not overwrite:
            raise UserError(f'{what} already exists: {dest} (remove it or pass --overwrite)')
        try:
            empty = not any(dest.iterdir())
        except OSError as e:
            raise UserError(f'{what} {dest} cannot be read ({e.strerror or e})') from None
        if not empty and not (is_ours is not None and is_ours(dest)):
            raise UserError(f'{what} {dest} is not {kind}; it is never replaced, even with --overwrite '
                            f'(remove it yourself or choose another path)')
    _check_creatable(dest.absolute(), what)


# ---------------------------------------------------------------------------------------------------------------
# Temporary siblings: `.{name}.{pid}-{host}-{random}.tmp`
# ---------------------------------------------------------------------------------------------------------------

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
# File names are at most 255 bytes on common file systems; a temporary sibling adds at most 31 to its stem
# ('.' + stem + '.' + pid + '-' + host + '-' + 8 random characters + '.tmp').
_NAME_MAX = 255
_STEM_MAX = _NAME_MAX - 40


def _tmp_stem(name: str) -> str:
    """`name`, or for a long one its first bytes and a hash of the whole, so a temporary sibling's name stays
    within the file system's limit for any legal output name."""
    raw = name.encode('utf-8', 'surrogateescape')
    if len(raw) <= _STEM_MAX:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:8]
    return raw[:_STEM_MAX - len(digest) - 1].decode('utf-8', 'ignore') + '~' + digest


def _tmp_prefix(dest: Path) -> str:
    return f'.{_tmp_stem(dest.name)}.{os.getpid()}-{_HOST}-'


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _clean_stale(dest: Path) -> List[Path]:
    """Remove temporary siblings of `dest` whose writer process (on this host) is gone; returns them.

    A folder that was moved aside while replacing `dest` (`*.old`) is moved back if `dest` is missing.
    Temporary siblings without a pid (older versions of this package) are reported, not removed.
    """
    parent = dest.parent
    if not parent.is_dir():
        return []
    ours = re.compile(rf'^\.{re.escape(_tmp_stem(dest.name))}\.(\d+)-([0-9a-f]{{6}})-.+\.(tmp|old)$')
    legacy = re.compile(rf'^\.{re.escape(dest.name)}\.([a-z0-9_]{{8}}\.tmp|old)$')
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = ours.match(entry.name)
        if m is None:
            if legacy.match(entry.name):
                _logger.warning(f'found {entry}, probably left by an interrupted run of an older timm_layerattn; '
                                f'remove it if nothing is writing {dest} now')
            continue
        pid, host, ext = int(m.group(1)), m.group(2), m.group(3)
        if host != _HOST or _pid_alive(pid):
            continue
        if ext == 'old' and not os.path.lexists(dest):
            with contextlib.suppress(OSError):
                entry.rename(dest)
                _logger.warning(f'restored {dest} from {entry.name}, left by an interrupted run (pid {pid})')
                continue
        _remove(entry)
        removed.append(entry)
        _logger.warning(f'removed {entry}, a temporary {"folder" if ext == "tmp" else "copy"} left by an '
                        f'interrupted run (pid {pid})')
    return removed


# ---------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------

_SIGNALS = tuple(s for s in (getattr(signal, 'SIGTERM', None), signal.SIGINT) if s is not None)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While open, SIGTERM (and SIGINT, if left at the OS default) raise `Terminated` instead of killing us.

    Only signals at their default action are taken over (an application's own handler, or an ignored
    signal, stays as it is), only in the main thread (the only one Python delivers signals to), and the
    previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in _SIGNALS:
        if signal.getsignal(s) is signal.SIG_DFL:
            previous[s] = signal.signal(s, _raise_terminated)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM / SIGINT back during a few renames that must not be cut in half; re-deliver them after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


# ---------------------------------------------------------------------------------------------------------------
# Atomic output
# ---------------------------------------------------------------------------------------------------------------

def _make_parent(dest: Path, what: str) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        probe = _nearest_existing(dest.parent)
        reason = f'{probe} is not a folder' if not probe.is_dir() else (e.strerror or str(e))
        raise UserError(f'{what} {dest} cannot be created: {reason}') from None


def _fix_permissions(tmp: Path) -> None:
    """mkdtemp / mkstemp create private (0700 / 0600) entries; give the result the usual permissions."""
    mask = _umask()
    for path in (tmp, *tmp.rglob('*')):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        elif path.stat().st_mode & 0o777 == 0o600:
            path.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(
        dest: PathLike,
        overwrite: bool = False,
        is_ours: Optional[Callable[[Path], bool]] = None,
        kind: str = 'an output folder of timm_layerattn',
        what: str = 'output folder',
) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `dest` only if the block completes.

    On any exception, SIGTERM included, the temporary folder is removed and `dest` is left as it was. An
    existing `dest` is replaced only with `overwrite`, and only if it is empty or `is_ours(dest)` (see
    `check_output_dir`, whose arguments these are); checked again just before the swap.
    """
    dest = Path(dest)
    _clean_stale(dest)  # first: it may put back a folder that an interrupted swap had moved aside
    check_output_dir(dest, overwrite, is_ours, kind, what)
    _make_parent(dest, what)
    with _terminate_cleanly():
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), suffix='.tmp', dir=dest.parent))
        except OSError as e:
            raise UserError(f'{what} {dest} cannot be written: {e.strerror or e}') from None
        try:
            yield tmp
            _fix_permissions(tmp)
            if os.path.lexists(dest):  # again: something may have appeared while the block ran
                check_output_dir(dest, overwrite, is_ours, kind, what)
            with _signals_deferred():
                if os.path.lexists(dest):
                    old = dest.with_name(f'{_tmp_prefix(dest)}swap.old')
                    dest.rename(old)
                    try:
                        tmp.rename(dest)
                    except BaseException:
                        old.rename(dest)
                        raise
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(dest)
        except BaseException as e:
            os_error = write_error(e, dest) if isinstance(e, Exception) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if os_error is not None:
                raise os_error from e
            raise


@contextlib.contextmanager
def atomic_file(dest: PathLike, mode: str = 'wb') -> Iterator:
    """Open a temporary sibling of `dest` for writing; rename it over `dest` on success only.

    Replaces an existing file (callers decide whether that needs `--overwrite`), never a folder.
    """
    dest = Path(dest)
    if dest.is_dir() and not dest.is_symlink():
        raise UserError(f'output file {dest} is an existing folder; it is never replaced (choose a file name)')
    _make_parent(dest, 'output file')
    _clean_stale(dest)
    with _terminate_cleanly():
        try:
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(dest), suffix='.tmp', dir=dest.parent)
        except OSError as e:
            raise UserError(f'output file {dest} cannot be written: {e.strerror or e}') from None
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
        except BaseException as e:
            os_error = write_error(e, dest) if isinstance(e, Exception) else None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if os_error is not None:
                raise os_error from e
            raise
