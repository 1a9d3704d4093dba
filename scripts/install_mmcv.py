"""Build, cache and install a CPU build of mmcv for the MMDetection extra.

MMDetection 3.3 needs ``mmcv>=2.0.0rc4,<2.2.0``.  mmcv 2.1.0 ships no wheel
for recent torch releases, and its sdist does not compile against torch >= 2.10
headers because its ``setup.py`` forces ``-std=c++14``/``-std=c++17`` while
those headers need C++20.  This installer, run with the interpreter that should
receive mmcv:

1. exits early when a usable mmcv (``mmcv.ops`` importable, version in range)
   plus mmengine and mmdet are already installed;
2. tries an official binary wheel (``--find-links`` can point at an index);
3. reuses a wheel it built earlier, cached per mmcv/torch/python/platform;
4. otherwise downloads the sdist, patches the C++ standard, builds a CPU-only
   wheel, stores it atomically in the cache and installs it;
5. installs mmengine and mmdet if missing, plus ``setuptools<82`` when
   ``pkg_resources`` is gone (mmengine needs it for ``mmdet::`` configs), and
   verifies the stack by running two mmcv ops in a fresh interpreter.

The compiled ops link against torch's C++ ABI, so cached wheels are keyed on
the exact ``torch.__version__``.  The build is CPU-only even on a GPU host.

Run it with the interpreter that should receive mmcv, from a checkout or an unpacked sdist of
timm-layerattn: ``python scripts/install_mmcv.py`` (``make install-test`` does). It is one self-contained
file: standard library only, it imports nothing of timm_layerattn (it runs before the package is
installed) and never imports torch in this process; everything touching torch runs in a child
interpreter (``sys.executable``). Its cache folder follows the package's ``cache_dir()`` rule
(``tests/test_install_mmcv.py`` checks that the two agree).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MMCV_VERSION = "2.1.0"
MMCV_MIN_VERSION = "2.0.0rc4"  # inclusive, from mmdet 3.3.0
MMCV_MAX_VERSION = "2.2.0"  # exclusive, from mmdet 3.3.0
MMENGINE_REQUIREMENT = "mmengine>=0.10,<1"
MMDET_REQUIREMENT = "mmdet>=3.3,<3.4"
# mmengine 0.10.x resolves "mmdet::..." config paths through pkg_resources,
# which setuptools 82 removed (torch 2.14 itself needs setuptools>=77.0.3).
PKG_RESOURCES_REQUIREMENT = "setuptools<82"
# setuptools<70: mmcv's setup.py imports pkg_resources, which newer setuptools
# no longer ship; ninja: torch's BuildExtension compiles in parallel with it
# and falls back to one file at a time without it.
BUILD_REQUIREMENTS = ("setuptools<70", "wheel", "ninja")
CACHE_ENV = "TIMM_LAYERATTN_CACHE"
LOG_TAIL_LINES = 25
HEARTBEAT_SECONDS = 60.0
_PROG = "install_mmcv"
_MARK = "@@install_mmcv@@"


class InstallError(Exception):
    """A failure reported as one line, optionally after the tail of a log."""

    def __init__(self, message: str, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.log_tail = log_tail


@dataclass(frozen=True)
class EnvInfo:
    """What the target interpreter has installed (probed in a child process)."""

    torch_version: str  # torch.__version__, local tag included (2.14.1+cu130)
    torch_git: str | None
    cxx11_abi: bool | None
    dists: dict[str, str | None]  # distribution name -> installed version
    mmcv_version: str | None  # set only when ``mmcv.ops`` imports
    mmcv_error: str | None
    has_pkg_resources: bool = False


@dataclass(frozen=True)
class Options:
    """Command-line options."""

    cache_dir: Path
    find_links: tuple[str, ...]
    force_rebuild: bool
    no_install: bool


# ----------------------------------------------------------------- helpers


def say(message: str) -> None:
    """Print a progress line immediately (the output is often a log file)."""
    print(f"[{_PROG}] {message}", flush=True)


def parse_version(text: str) -> tuple[tuple[int, ...], int, int]:
    """Parse the release and pre-release parts of a PEP 440 version.

    Post, dev and local segments are ignored; that is enough to compare mmcv
    versions against the ``[2.0.0rc4, 2.2.0)`` window.
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)(?:[-_.]?(a|b|rc|c)[-_.]?(\d*))?", text)
    if not match:
        raise ValueError(f"unparsable version: {text!r}")
    release = tuple(int(part) for part in match.group(1).split("."))
    release = release + (0,) * (4 - len(release)) if len(release) < 4 else release
    stage_rank = {"a": 0, "b": 1, "c": 2, "rc": 2}
    if match.group(2):
        return release, stage_rank[match.group(2)], int(match.group(3) or 0)
    return release, 3, 0


def mmcv_version_ok(version: str) -> bool:
    """Whether an mmcv version lies in the window mmdet 3.3 accepts."""
    try:
        parsed = parse_version(version)
    except ValueError:
        return False
    return parse_version(MMCV_MIN_VERSION) <= parsed < parse_version(MMCV_MAX_VERSION)


def default_cache_dir() -> Path:
    """``$TIMM_LAYERATTN_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/timm-layerattn``.

    The rule of the package's ``timm_layerattn._utils.env.cache_dir()``, restated here because this
    script cannot import the package (a test checks that both agree).
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "timm-layerattn"


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def python_tag() -> str:
    """Wheel-style tag of this interpreter, e.g. ``cp311``."""
    impl = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
    return f"{impl}{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"


def platform_tag() -> str:
    """Wheel-style platform tag, e.g. ``linux_x86_64``."""
    return re.sub(r"[^A-Za-z0-9]", "_", sysconfig.get_platform())


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last non-blank lines of ``text``, without pip's index-location noise."""
    kept = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("WARNING: Location '")
    ]
    return "\n".join(kept[-lines:])


def file_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a (possibly large) log file."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64 * 1024))
            return tail(handle.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""


@contextlib.contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache so two builds don't race."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking, atomic renames still apply
        yield
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"waiting for another install_mmcv run holding {cache_dir / '.lock'} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------- child interpreters

_PROBE_CODE = r"""
import importlib.metadata as md, json, sys
M = sys.argv[1]
def dist(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
names = ("torch", "torchvision", "mmcv", "mmcv-lite", "mmcv-full", "mmengine", "mmdet")
print(M + "dists " + json.dumps({n: dist(n) for n in names}), flush=True)
import importlib.util
print(M + "pkg_resources " + json.dumps(importlib.util.find_spec("pkg_resources") is not None))
try:
    import torch
except Exception as exc:
    print(M + "torch_error " + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
    raise SystemExit(0)
abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
print(M + "torch " + json.dumps({"version": torch.__version__,
    "git": getattr(torch.version, "git_version", None),
    "abi": None if abi is None else bool(abi)}), flush=True)
try:
    import mmcv, mmcv.ops
    print(M + "mmcv " + json.dumps(mmcv.__version__), flush=True)
except Exception as exc:
    print(M + "mmcv_error " + json.dumps(f"{type(exc).__name__}: {exc}"), flush=True)
"""

_VERIFY_CODE = r"""
import importlib.metadata as md, os, warnings
warnings.simplefilter("ignore")
import mmcv, mmcv.ops, mmdet, mmengine, numpy, torch
from mmengine.utils import get_installed_path  # needs pkg_resources
assert os.path.isdir(os.path.join(get_installed_path("mmdet"), ".mim", "configs"))
from mmcv.ops import nms, roi_align
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])
scores = torch.tensor([0.9, 0.8, 0.7])
dets, keep = nms(boxes, scores, iou_threshold=0.5)
assert keep.tolist() == [0, 2], keep
feats = torch.arange(16.).view(1, 1, 4, 4)
rois = torch.tensor([[0., 0., 0., 3., 3.]])
assert roi_align(feats, rois, (2, 2), 1.0, 0, "avg", True).shape == (1, 1, 2, 2)
def dist(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(f"mmcv {mmcv.__version__} (ops ok), mmdet {mmdet.__version__}, "
      f"mmengine {mmengine.__version__}, torch {torch.__version__}, "
      f"numpy {numpy.__version__}, setuptools {dist('setuptools')}")
"""


def probe_env() -> EnvInfo:
    """Inspect the target interpreter in a child process (torch stays out of ours)."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE_CODE, _MARK],
        capture_output=True,
        text=True,
        check=False,
    )
    found: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            key, _, payload = line[len(_MARK) :].partition(" ")
            found[key] = json.loads(payload)
    if "torch_error" in found:
        raise InstallError(
            f"torch is not importable in {sys.executable} ({found['torch_error']}); "
            "install torch first, e.g. pip install torch==2.14.1 torchvision==0.29.1"
        )
    if "torch" not in found:
        raise InstallError(
            f"could not inspect {sys.executable} (exit {proc.returncode})",
            tail(proc.stdout + proc.stderr),
        )
    torch_info: dict[str, Any] = found["torch"]
    mmcv_error = found.get("mmcv_error")
    if "mmcv" not in found and mmcv_error is None:  # crashed while importing mmcv
        mmcv_error = f"interpreter died importing mmcv.ops (exit {proc.returncode})"
    return EnvInfo(
        torch_version=str(torch_info["version"]),
        torch_git=torch_info.get("git"),
        cxx11_abi=torch_info.get("abi"),
        dists=dict(found.get("dists") or {}),
        mmcv_version=found.get("mmcv"),
        mmcv_error=mmcv_error,
        has_pkg_resources=bool(found.get("pkg_resources")),
    )


def mmcv_usable(info: EnvInfo) -> bool:
    """``mmcv.ops`` imports and the version suits mmdet 3.3."""
    return info.mmcv_version is not None and mmcv_version_ok(info.mmcv_version)


def mmdet_stack_present(info: EnvInfo) -> bool:
    """mmengine 0.10.x, mmdet 3.3.x and pkg_resources (used by mmengine) are installed."""
    engine, det = info.dists.get("mmengine"), info.dists.get("mmdet")
    try:
        return (
            info.has_pkg_resources
            and engine is not None
            and parse_version("0.10") <= parse_version(engine) < parse_version("1")
            and det is not None
            and parse_version("3.3") <= parse_version(det) < parse_version("3.4")
        )
    except ValueError:
        return False


class Pip:
    """Runs ``sys.executable -m pip`` with torch pinned to what is installed.

    Every call gets a constraints file pinning torch/torchvision to their
    installed versions, so nothing here can make pip swap torch.  All output
    is appended to one log file in the cache directory.
    """

    def __init__(self, info: EnvInfo, workdir: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.constraints = workdir / "torch-pin.txt"
        pins = [
            f"{name}=={version}"
            for name in ("torch", "torchvision")
            if (version := info.dists.get(name))
        ]
        self.constraints.write_text("\n".join(pins) + "\n")

    def _log(self) -> IO[str]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        return self.log_path.open("a", encoding="utf-8")

    def command(self, args: Sequence[str]) -> list[str]:
        """The full pip command line for ``args``."""
        return [sys.executable, "-m", "pip", *args, "-c", str(self.constraints)]

    def run(
        self, args: Sequence[str], what: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run pip, log its output and raise ``InstallError`` on failure if ``check``."""
        cmd = self.command(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        with self._log() as log:
            log.write(
                f"\n$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}[exit {proc.returncode}]\n"
            )
        if check and proc.returncode != 0:
            raise InstallError(
                f"pip failed while {what} (exit {proc.returncode}); full log: {self.log_path}",
                tail(proc.stdout + proc.stderr),
            )
        return proc

    def stream(self, args: Sequence[str], what: str, env: dict[str, str]) -> None:
        """Run a long pip command with output going straight to the log file.

        Prints a heartbeat with ninja's ``[done/total]`` progress meanwhile.
        """
        cmd = self.command(args)
        with self._log() as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            while True:
                try:
                    code = proc.wait(timeout=HEARTBEAT_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    progress = re.findall(
                        r"^\s*\[(\d+)/(\d+)\]", file_tail(self.log_path, 400), re.M
                    )
                    step = f", compiled {progress[-1][0]}/{progress[-1][1]}" if progress else ""
                    say(f"  ... {what}: {_minutes(time.monotonic() - start)} elapsed{step}")
                except BaseException:
                    proc.kill()
                    proc.wait()
                    raise
            log.write(f"[exit {code}]\n")
        if code != 0:
            raise InstallError(
                f"pip failed while {what} (exit {code}); full log: {self.log_path}",
                file_tail(self.log_path),
            )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ------------------------------------------------------------------ cache


def cache_key(info: EnvInfo) -> str:
    """Directory name identifying a compatible wheel.

    The compiled ops link against torch's C++ ABI, so the key uses the exact
    ``torch.__version__`` (local tag such as ``+cu130`` included) besides the
    mmcv version, the Python ABI tag and the platform.
    """
    raw = f"mmcv{MMCV_VERSION}-cpu_torch{info.torch_version}_{python_tag()}_{platform_tag()}"
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", raw)


def build_info(info: EnvInfo) -> dict[str, object]:
    """Metadata stored next to a cached wheel and checked before reuse."""
    return {
        "mmcv": MMCV_VERSION,
        "torch": info.torch_version,
        "torch_git": info.torch_git,
        "cxx11_abi": info.cxx11_abi,
        "python": python_tag(),
        "platform": platform_tag(),
        "variant": "cpu",
    }


def find_cached_wheel(slot: Path, info: EnvInfo) -> Path | None:
    """A cached wheel in ``slot`` built against this exact torch, if any."""
    wheels = sorted(slot.glob(f"mmcv-{MMCV_VERSION}-*.whl"))
    if not wheels or not zipfile.is_zipfile(wheels[-1]):
        return None
    try:
        stored = json.loads((slot / "build-info.json").read_text())
    except (OSError, ValueError):
        stored = {}
    expected = build_info(info)
    for field in ("torch", "torch_git", "cxx11_abi"):
        if stored.get(field) is not None and stored.get(field) != expected[field]:
            say(
                f"cached wheel {wheels[-1].name} was built for "
                f"{field}={stored.get(field)}; ignoring it"
            )
            return None
    return wheels[-1]


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` via a temporary file and ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp_name)
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def atomic_write_text(dest: Path, text: str) -> None:
    """Write ``text`` to ``dest`` atomically."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, dest)


# ------------------------------------------------------------------ build


def check_toolchain() -> None:
    """Fail early and clearly when no C++ compiler or Python headers exist."""
    cxx = os.environ.get("CXX") or "c++"
    compiler = shlex.split(cxx)[0] if cxx.strip() else "c++"
    if shutil.which(compiler) is None:
        raise InstallError(
            f"no C++ compiler found (looked for {compiler!r}; set CXX or install one, "
            "e.g. apt-get install g++)"
        )
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        raise InstallError(
            f"Python headers missing ({header}); install the python3-dev package for "
            f"{sys.executable}"
        )


_STD_FLAG = re.compile(r"(?P<lead>[-/])std(?P<sep>[=:])c\+\+(?:14|17)\b")


def patch_setup_py(setup_py: Path) -> int:
    """Make mmcv's setup.py compile with C++20 instead of C++14/17.

    Returns the number of flags replaced.  Raises ``InstallError`` if the
    GCC/Clang ``-std=c++17`` flag this patch exists for is not there.
    """
    text = setup_py.read_text(encoding="utf-8")
    if "-std=c++17" not in text:
        if "-std=c++20" in text and "-std=c++14" not in text:
            return 0  # already patched
        raise InstallError(
            f"cannot patch {setup_py}: no '-std=c++17' flag found; the mmcv {MMCV_VERSION} "
            "sdist is not laid out as expected"
        )
    patched, count = _STD_FLAG.subn(lambda m: f"{m['lead']}std{m['sep']}c++20", text)
    if _STD_FLAG.search(patched):
        raise InstallError(f"patching {setup_py} left C++14/17 flags behind")
    setup_py.write_text(patched, encoding="utf-8")
    return count


def extract_sdist(archive: Path, dest: Path) -> Path:
    """Unpack the sdist and return the directory holding setup.py."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4
            tar.extractall(dest)  # noqa: S202 - archive comes from the package index
    candidates = sorted(dest.glob("*/setup.py"))
    if not candidates:
        raise InstallError(f"no setup.py inside {archive.name}")
    return candidates[0].parent


def build_wheel(pip: Pip, workdir: Path, out_dir: Path) -> Path:
    """Download, patch and build the mmcv sdist; return the built wheel.

    Build requirements go to a private ``--target`` directory put first on
    PYTHONPATH, so the interpreter's own setuptools is left untouched (torch
    2.14 itself requires setuptools>=77, which has no pkg_resources).
    """
    check_toolchain()
    tools = workdir / "build-tools"
    say(f"installing build tools ({', '.join(BUILD_REQUIREMENTS)}) into a private dir")
    pip.run(
        ["install", "--quiet", "--target", str(tools), *BUILD_REQUIREMENTS],
        "installing build tools",
    )

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tools), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(tools / "bin"), env.get("PATH", "")])
    env.update(
        MMCV_WITH_OPS="1",
        FORCE_CUDA="0",
        # mmcv compiles CUDA ops whenever torch sees a GPU; hide it for a CPU build.
        CUDA_VISIBLE_DEVICES="",
        HIP_VISIBLE_DEVICES="",
        MAX_JOBS=os.environ.get("MAX_JOBS") or str(cpu_count()),
        PIP_NO_INPUT="1",
    )

    say(f"downloading the mmcv {MMCV_VERSION} sdist")
    sdist_dir = workdir / "sdist"
    # --no-build-isolation: preparing metadata runs setup.py, which needs
    # pkg_resources (from our tools dir) and torch (from the interpreter).
    pip.run(
        [
            "download",
            f"mmcv=={MMCV_VERSION}",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "--dest",
            str(sdist_dir),
        ],
        "downloading the mmcv sdist",
        env=env,
    )
    archives = sorted(sdist_dir.glob(f"mmcv-{MMCV_VERSION}.tar.gz"))
    if not archives:
        raise InstallError(f"pip download left no mmcv-{MMCV_VERSION}.tar.gz in {sdist_dir}")
    src = extract_sdist(archives[0], workdir / "src")
    count = patch_setup_py(src / "setup.py")
    say(f"patched setup.py: {count} C++ standard flag(s) -> -std=c++20")

    say(
        f"compiling mmcv ops for CPU with MAX_JOBS={env['MAX_JOBS']} "
        f"(about 25 min on 2 cores); log: {pip.log_path}"
    )
    pip.stream(
        [
            "wheel",
            "--verbose",
            "--no-build-isolation",
            "--no-deps",
            "--wheel-dir",
            str(out_dir),
            str(src),
        ],
        "building mmcv",
        env=env,
    )
    wheels = sorted(out_dir.glob(f"mmcv-{MMCV_VERSION}-*.whl"))
    if not wheels:
        raise InstallError(
            f"the build produced no mmcv wheel; log: {pip.log_path}", file_tail(pip.log_path)
        )
    if "-none-any.whl" in wheels[0].name:
        raise InstallError(
            f"the build produced a pure-Python wheel ({wheels[0].name}): "
            f"the ops were not compiled; log: {pip.log_path}"
        )
    return wheels[0]


# ---------------------------------------------------------------- install


def try_binary_wheel(pip: Pip, find_links: Sequence[str]) -> bool:
    """Try ``mmcv==MMCV_VERSION`` from binary wheels only; True if usable."""
    args = ["install", f"mmcv=={MMCV_VERSION}", "--only-binary", "mmcv"]
    for url in find_links:
        args += ["--find-links", url]
    say(
        "looking for a prebuilt mmcv wheel"
        + (f" (also in {', '.join(find_links)})" if find_links else "")
    )
    if pip.run(args, "installing a binary mmcv", check=False).returncode != 0:
        say("no prebuilt mmcv wheel for this torch/python; using the cache or building")
        return False
    info = probe_env()
    if mmcv_usable(info):
        say(f"installed prebuilt mmcv {info.mmcv_version}")
        return True
    say(f"the prebuilt mmcv wheel does not work here ({info.mmcv_error}); removing it")
    pip.run(["uninstall", "--yes", "mmcv"], "removing the unusable mmcv", check=False)
    return False


def install_wheel(pip: Pip, wheel: Path, info: EnvInfo) -> None:
    """Install ``wheel`` over whatever mmcv is there, then its dependencies."""
    if info.dists.get("mmcv-lite") or info.dists.get("mmcv-full"):
        pip.run(["uninstall", "--yes", "mmcv-lite", "mmcv-full"], "removing mmcv-lite/mmcv-full")
    say(f"installing {wheel.name}")
    pip.run(["install", "--force-reinstall", "--no-deps", str(wheel)], "installing mmcv")
    pip.run(["install", str(wheel)], "installing mmcv's dependencies")


def ensure_mmdet(pip: Pip) -> None:
    """Install mmengine and mmdet unless present, and a setuptools with pkg_resources."""
    say(f"ensuring {MMENGINE_REQUIREMENT} and {MMDET_REQUIREMENT}")
    pip.run(["install", MMENGINE_REQUIREMENT, MMDET_REQUIREMENT], "installing mmengine/mmdet")
    has_it = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u, sys; sys.exit(u.find_spec('pkg_resources') is None)",
        ],
        check=False,
    )
    if has_it.returncode != 0:
        say(
            f"pkg_resources is missing (mmengine needs it for 'mmdet::' configs); "
            f"installing {PKG_RESOURCES_REQUIREMENT}"
        )
        pip.run(["install", PKG_RESOURCES_REQUIREMENT], "installing setuptools")


def verify() -> str:
    """Import the stack and run two mmcv ops in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY_CODE], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise InstallError(
            "verification failed: mmcv.ops/mmdet do not import or run",
            tail(proc.stdout + proc.stderr),
        )
    return proc.stdout.strip().splitlines()[-1]


def ensure_wheel(opts: Options, info: EnvInfo, pip: Pip, workdir: Path) -> Path:
    """Return a cached wheel for this environment, building it if needed."""
    slot = opts.cache_dir / "wheels" / cache_key(info)
    with cache_lock(opts.cache_dir):
        cached = None if opts.force_rebuild else find_cached_wheel(slot, info)
        if cached is not None:
            say(f"using cached wheel {cached}")
            return cached
        start = time.monotonic()
        built = build_wheel(pip, workdir, workdir / "dist")
        dest = slot / built.name
        atomic_copy(built, dest)
        atomic_write_text(slot / "build-info.json", json.dumps(build_info(info), indent=2) + "\n")
        say(f"built {built.name} in {_minutes(time.monotonic() - start)}; cached at {dest}")
        return dest


def run(opts: Options) -> int:
    """Carry out the install; raises ``InstallError`` on failure."""
    started = time.monotonic()
    info = probe_env()
    if not opts.force_rebuild and not opts.no_install and mmcv_usable(info):
        if mmdet_stack_present(info):
            say(
                f"already installed: mmcv {info.mmcv_version}, mmengine "
                f"{info.dists.get('mmengine')}, mmdet {info.dists.get('mmdet')} "
                f"(torch {info.torch_version})"
            )
            return 0
        say(f"mmcv {info.mmcv_version} already installed")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = opts.cache_dir / "logs" / f"install-mmcv-{stamp}-{os.getpid()}.log"
    say(f"python {sys.executable}, torch {info.torch_version}; cache {opts.cache_dir}")
    with tempfile.TemporaryDirectory(prefix="timm-layerattn-mmcv-") as tmp:
        workdir = Path(tmp)
        pip = Pip(info, workdir, log_path)
        if opts.no_install:
            wheel = ensure_wheel(opts, info, pip, workdir)
            say(f"wheel ready: {wheel}")
            return 0
        if opts.force_rebuild or not mmcv_usable(info):
            if opts.force_rebuild or not try_binary_wheel(pip, opts.find_links):
                wheel = ensure_wheel(opts, info, pip, workdir)
                install_wheel(pip, wheel, info)
        ensure_mmdet(pip)
    say("verifying: " + verify())
    say(f"done in {_minutes(time.monotonic() - started)}")
    return 0


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="python scripts/install_mmcv.py",
        description=f"Install mmcv {MMCV_VERSION} (building and caching a CPU wheel if "
        "needed), mmengine and mmdet into the running interpreter.",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"wheel/log cache (default: ${CACHE_ENV} or "
        "${XDG_CACHE_HOME:-~/.cache}/timm-layerattn)",
    )
    parser.add_argument(
        "--find-links",
        action="append",
        default=[],
        metavar="URL",
        help="extra place to look for a prebuilt mmcv wheel, e.g. the "
        "OpenMMLab index matching your torch/CUDA (repeatable)",
    )
    parser.add_argument(
        "--force-rebuild",
        action="store_true",
        help="ignore installed/prebuilt/cached mmcv and rebuild the wheel",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="only make sure the wheel is built and cached"
    )
    ns = parser.parse_args(argv)
    cache_dir = (ns.cache_dir.expanduser() if ns.cache_dir else default_cache_dir()).absolute()
    return Options(
        cache_dir=cache_dir,
        find_links=tuple(ns.find_links),
        force_rebuild=ns.force_rebuild,
        no_install=ns.no_install,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    opts = parse_args(argv)
    try:
        return run(opts)
    except InstallError as err:
        if err.log_tail:
            print(err.log_tail, file=sys.stderr)
        print(f"{_PROG}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"{_PROG}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
