"""timm's own model tests over this package's models: `tests/test_models.py` from the sdist of the installed timm.

`load()` returns that file as a module, ready for `tests/test_timm_models.py` to collect:

1. The sdist is fetched once from the package registry (`pip download --no-deps --no-binary :all:
   timm==<installed version>`) into the package cache (`$TIMM_LAYERATTN_CACHE`, else `~/.cache/timm-layerattn`:
   `timm-sdist/`); `tests/test_models.py` is extracted from it with one line added after a header, `import
   timm_layerattn`, and cached as `timm-tests/<version>/test_models.py`. Later runs read that file (offline).
   To seed an offline machine, put the sdist in `timm-sdist/` (or the extracted file in `timm-tests/<version>/`).
2. The file is imported with `timm.list_models` / `timm.list_pretrained` restricted to this package's names.
   Its parametrisations are built at import from those calls, so timm's own filters (exclusions,
   `pretrained=True`, `name_matches_cfg`, ...) decide which of our models each test takes. Its one `module=`
   filter lists the modules whose models support `forward_intermediates` and the `FeatureGetterNet` wrapper;
   ours are added to it, as they all do.
3. `tests(module)` keeps what timm's CI runs (tests with one of its job markers) and is parametrised over our
   names only: the others are timm's tests of its own models (hard-coded names), or tests its CI skips.

Input sizes follow timm's rule (`_get_input_size`: the model's `min_input_size` where its default is above
the test's target size, else the default cut to the target), with the file's target sizes capped at
`TARGET_SIZE`.
"""
import contextlib
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pytest
import timm
import torch
from timm.models import model_entrypoint

import timm_layerattn
from timm_layerattn._utils.env import cache_dir

MODULE_NAME = 'timm_test_models'  # the module name the extracted file is imported under
ADDED_LINE = 'import timm_layerattn  # noqa: F401  (added: registers the models of timm-layerattn with timm)'
PIP_TIMEOUT_S = 300
# Cap of the file's target input sizes (`TARGET_*_SIZE`: 384 px forward, 128 px backward / fx / TorchScript, 96 px
# features), the contract tests' ImageNet size. timm takes a model's `min_input_size` where its default is above
# the target, else the default cut to the target; our ImageNet nets declare no minimum, and at timm's targets
# a ResNet-101's forward test alone took 10-15 s. CIFAR nets keep 32 px, GradAttn its 28 px minimum.
TARGET_SIZE = 64


class Unavailable(RuntimeError):
    """timm's test file could not be obtained (no network and nothing cached, or an unreadable sdist)."""


def in_ci() -> bool:
    """True under a CI runner (`CI` set and not false), where the suite must run rather than skip."""
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no', 'off')


def version() -> str:
    return timm.__version__


def sdist_path(ver: Optional[str] = None) -> Path:
    return cache_dir() / 'timm-sdist' / f'timm-{ver or version()}.tar.gz'


def tests_path(ver: Optional[str] = None) -> Path:
    return cache_dir() / 'timm-tests' / (ver or version()) / 'test_models.py'


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created), so that xdist workers fetch once; no lock where `fcntl` is missing
    (the files are written atomically anyway)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(ver: str, target: Path) -> None:
    """`pip download` the sdist of `timm==ver` into `target` (the registry's sdist, never a wheel)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='.download-', dir=target.parent) as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '--retries', '1',
               '--timeout', '30', '--disable-pip-version-check', '-d', tmp, f'timm=={ver}']
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Unavailable(f'`pip download timm=={ver}` did not finish: {e}') from e
        found = sorted(Path(tmp).glob(f'timm-{ver}.tar.gz'))
        if result.returncode or not found:
            lines = [ln for ln in (result.stderr or result.stdout).strip().splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.lstrip().startswith('ERROR')] or lines
            raise Unavailable(f'`pip download --no-binary :all: timm=={ver}` failed (exit status {result.returncode}): '
                              f'{" | ".join(errors[-3:]) or "no output"}')
        os.replace(found[0], target)


def _extract(sdist: Path, ver: str) -> bytes:
    """`tests/test_models.py` of the sdist with the header and the added import in front."""
    member = f'timm-{ver}/tests/test_models.py'
    try:
        with tarfile.open(sdist) as tar:
            info = tar.extractfile(f'timm-{ver}/PKG-INFO')
            meta = info.read().decode() if info is not None else ''
            if f'\nVersion: {ver}\n' not in meta:
                raise Unavailable(f'{sdist} is not the sdist of timm {ver} (PKG-INFO has no "Version: {ver}")')
            src = tar.extractfile(member)
            if src is None:
                raise KeyError(member)
            text = src.read()
    except (tarfile.TarError, OSError, KeyError, EOFError) as e:
        raise Unavailable(f'cannot read {member} from {sdist}: {type(e).__name__}: {e}') from e
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    header = (
        f"# timm {ver}'s tests/test_models.py, from {sdist.name} (sha256 {digest}),\n"
        f"# extracted by timm-layerattn's tests/_timm_suite.py. One line is added, the next one; the rest is\n"
        f"# timm's file, unchanged.\n"
        f'{ADDED_LINE}\n'
    )
    return header.encode() + text


def fetch(ver: Optional[str] = None) -> Path:
    """The cached, extracted test file of timm `ver` (the installed version by default), fetched if missing."""
    ver = ver or version()
    path = tests_path(ver)
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Unavailable(f'cannot create the cache folder {path.parent}: {e}') from e
    with _locked(path.parent / '.lock'):
        if path.exists():  # another worker fetched it meanwhile
            return path
        sdist = sdist_path(ver)
        if not sdist.exists():
            _download(ver, sdist)
        _write_atomic(path, _extract(sdist, ver))
    return path


def our_names() -> List[str]:
    return timm_layerattn.models.list_models()


def _arch(name: str) -> str:
    return name.split('.', 1)[0]


def _restricted(fn: Callable[..., List[str]], ours: frozenset, modules: Tuple[str, ...]) -> Callable[..., List[str]]:
    """`fn` (`list_models` / `list_pretrained`) keeping our names only. A `module=` filter gets our modules
    added: timm's file uses it for one list, the modules whose models have `forward_intermediates` and work
    with the `FeatureGetterNet` wrapper (`FEAT_INTER_FILTERS`), which ours all do."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get('module'):
            listed = [kwargs['module']] if isinstance(kwargs['module'], str) else list(kwargs['module'])
            kwargs['module'] = listed + [m for m in modules if m not in listed]
        return [n for n in fn(*args, **kwargs) if _arch(n) in ours]
    return wrapper


_HAS_JIT_SETTINGS = hasattr(torch._C, '_jit_set_profiling_executor') and hasattr(torch._C, '_jit_set_profiling_mode')


def _jit_get() -> Tuple[bool, bool]:
    """TorchScript's (profiling executor, profiling mode) switches (the setters return the previous value)."""
    if not _HAS_JIT_SETTINGS:
        return True, True
    executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(executor)
    mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(mode)
    return executor, mode


def _jit_set(values: Tuple[bool, bool]) -> None:
    if _HAS_JIT_SETTINGS:
        torch._C._jit_set_profiling_executor(values[0])
        torch._C._jit_set_profiling_mode(values[1])


def load(path: Optional[Path] = None) -> ModuleType:
    """Import timm's test file (`fetch()` by default) with the model lists restricted to this package's names.

    The file switches TorchScript to the profiling executor without profiling runs at import, for the whole
    process; that is undone here, and `module.jit_settings` holds what it set (`timm_jit()` applies it)."""
    path = path or fetch()
    ours = frozenset(our_names())
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    saved = timm.list_models, timm.list_pretrained
    jit_before = _jit_get()
    # timm keys a model's module by the last component of its entrypoint's module name
    modules = tuple(sorted({model_entrypoint(n).__module__.split('.')[-1] for n in ours}))
    timm.list_models = _restricted(saved[0], ours, modules)
    timm.list_pretrained = _restricted(saved[1], ours, modules)
    try:  # an error here is a failure of the file or of our models, never a reason to skip
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)  # timm's CI job markers
            spec.loader.exec_module(module)
    finally:
        timm.list_models, timm.list_pretrained = saved
        module.jit_settings = _jit_get()
        _jit_set(jit_before)
    for attr, value in vars(module).items():
        if attr.startswith('TARGET_') and attr.endswith('_SIZE') and isinstance(value, int):
            setattr(module, attr, min(value, TARGET_SIZE))
    return module


@contextlib.contextmanager
def timm_jit(module: ModuleType) -> Iterator[None]:
    """TorchScript set as timm's test file sets it, inside the block."""
    before = _jit_get()
    _jit_set(module.jit_settings)
    try:
        yield
    finally:
        _jit_set(before)


def _argnames(mark) -> List[str]:
    """The argument names of a `parametrize` mark ([] for any other mark)."""
    if mark.name != 'parametrize' or not mark.args:
        return []
    names = mark.args[0]
    return [a.strip() for a in names.split(',')] if isinstance(names, str) else list(names)


def model_names(fn: Callable) -> Optional[List[str]]:
    """The `model_name` values `fn` is parametrised with, None if it is not."""
    for mark in getattr(fn, 'pytestmark', []):
        names = _argnames(mark)
        if 'model_name' in names:
            i = names.index('model_name')
            # a pytest.param(...) holds a tuple of all its values; a plain case is that tuple or, alone, the value
            cases = [v.values if hasattr(v, 'values') else v if len(names) > 1 else (v,) for v in mark.args[1]]
            return [c[i] for c in cases]
    return None


# Marks of pytest and its plugins; any other mark on a test of timm's file is one of timm's CI job markers.
_GENERIC_MARKS = frozenset({'parametrize', 'timeout', 'skip', 'skipif', 'xfail', 'usefixtures', 'filterwarnings'})


def in_timm_ci(fn: Callable) -> bool:
    """Whether timm's CI runs `fn`: its file says tests without a job marker (`base`, `cfg`, `forward`, ...) are
    skipped there (the slow pruning contract, fx + TorchScript, pretrained downloads)."""
    return any(mark.name not in _GENERIC_MARKS for mark in getattr(fn, 'pytestmark', []))


def tests(module: ModuleType, heavy: Iterable[str] = ()) -> Dict[str, Callable]:
    """The tests of `module` that timm's CI runs and that are parametrised over our model names only; their
    cases of the `heavy` models get the `heavy` mark."""
    ours = frozenset(our_names())
    out = {}
    for name, obj in vars(module).items():
        if name.startswith('test_') and callable(obj) and in_timm_ci(obj):
            values = model_names(obj)
            if values and all(isinstance(v, str) and _arch(v) in ours for v in values):
                out[name] = _mark_heavy(obj, frozenset(heavy))
    return out


def _mark_heavy(fn: Callable, heavy: frozenset) -> Callable:
    """`fn` with its `model_name` cases of `heavy` architectures marked `heavy` (in place: the module is ours)."""
    marks = list(getattr(fn, 'pytestmark', []))
    for k, mark in enumerate(marks):
        if _argnames(mark) != ['model_name']:
            continue
        values = [pytest.param(v, marks=pytest.mark.heavy) if isinstance(v, str) and _arch(v) in heavy else v
                  for v in mark.args[1]]
        marks[k] = pytest.mark.parametrize(mark.args[0], values, *mark.args[2:], **mark.kwargs).mark
    fn.pytestmark = marks
    return fn


def fixtures(module: ModuleType) -> Dict[str, Callable]:
    """The pytest fixtures `module` defines (pytest finds them among a test module's globals)."""
    return {n: o for n, o in vars(module).items()
            if type(o).__name__ == 'FixtureFunctionDefinition' or hasattr(o, '_pytestfixturefunction')}
