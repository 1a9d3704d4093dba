"""Fast, torch-free tests for the mmcv installer, scripts/install_mmcv.py (no build is run).

The installer is a standalone script outside the package (it runs before the package is installed); it is
loaded here by path, as `make install-test` runs it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = REPO / "scripts" / "install_mmcv.py"
# The package's cache folder rule; a module without package imports, so it loads by path without torch.
PACKAGE_ENV_PATH = REPO / "timm_layerattn" / "_utils" / "env.py"


def _load(path: Path = MODULE_PATH, name: str = "install_mmcv_under_test"):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through here
    spec.loader.exec_module(module)
    return module


im = _load()

SETUP_PY = """\
        extra_compile_args = {
            'nvcc': [cuda_args, '-std=c++14'] if cuda_args else ['-std=c++14'],
            'cxx': ['-std=c++14'],
        }
            if parse_version(torch.__version__) <= parse_version('1.12.1'):
                extra_compile_args['cxx'] = ['-std=c++14']
            else:
                extra_compile_args['cxx'] = ['-std=c++17']
        else:
                extra_compile_args['cxx'] = ['/std:c++17']
        # c++14 features, the argument ['std=c++14'] must be added here.
"""


def _env(torch_version: str = "2.14.1+cu130", git: str | None = "abc") -> object:
    return im.EnvInfo(
        torch_version=torch_version,
        torch_git=git,
        cxx11_abi=True,
        dists={"torch": "2.14.1"},
        mmcv_version=None,
        mmcv_error=None,
    )


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("2.0.0rc4", True),
        ("2.0.0rc3", False),
        ("2.0.0", True),
        ("2.1.0", True),
        ("2.1", True),
        ("2.1.0.post1", True),
        ("2.2.0", False),
        ("1.7.2", False),
        ("garbage", False),
    ],
)
def test_mmcv_version_window(version: str, ok: bool) -> None:
    assert im.mmcv_version_ok(version) is ok


def test_patch_setup_py_replaces_every_std_flag(tmp_path: Path) -> None:
    setup_py = tmp_path / "setup.py"
    setup_py.write_text(SETUP_PY)
    assert im.patch_setup_py(setup_py) == 6
    text = setup_py.read_text()
    assert "c++14'" not in text.replace("['std=c++14']", "") and "c++17" not in text
    assert text.count("-std=c++20") == 5 and "/std:c++20" in text
    assert "['std=c++14'] must be added" in text  # comments are left alone
    assert im.patch_setup_py(setup_py) == 0  # idempotent


def test_patch_setup_py_fails_clearly_without_flag(tmp_path: Path) -> None:
    setup_py = tmp_path / "setup.py"
    setup_py.write_text("setup(name='mmcv')\n")
    with pytest.raises(im.InstallError, match="no '-std=c\\+\\+17' flag"):
        im.patch_setup_py(setup_py)


def test_cache_key_uses_exact_torch_version() -> None:
    key_cuda = im.cache_key(_env("2.14.1+cu130"))
    key_cpu = im.cache_key(_env("2.14.1+cpu"))
    assert key_cuda != key_cpu
    assert "torch2.14.1+cu130" in key_cuda and im.python_tag() in key_cuda
    assert "/" not in key_cuda


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIMM_LAYERATTN_CACHE", str(tmp_path / "explicit"))
    assert im.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("TIMM_LAYERATTN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert im.default_cache_dir() == tmp_path / "xdg" / "timm-layerattn"


def test_cached_wheel_rejected_for_other_torch_build(tmp_path: Path) -> None:
    wheel = tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mmcv/__init__.py", "")
    im.atomic_write_text(
        tmp_path / "build-info.json", '{"torch": "2.14.1+cu130", "torch_git": "abc"}'
    )
    assert im.find_cached_wheel(tmp_path, _env()) == wheel
    assert im.find_cached_wheel(tmp_path, _env(git="other")) is None
    wheel.write_bytes(b"truncated")
    assert im.find_cached_wheel(tmp_path, _env()) is None


def test_runs_as_plain_script_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, str(MODULE_PATH), "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "--force-rebuild" in proc.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import runpy, sys; runpy.run_path({str(MODULE_PATH)!r}); "
            "print('torch' in sys.modules, 'timm_layerattn' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.stdout.strip() == "False False"


def test_imports_only_the_standard_library() -> None:
    """Self-contained: nothing it imports needs an install (no torch, no timm_layerattn, no third party)."""
    tree = ast.parse(MODULE_PATH.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a standalone script"
            imported.add((node.module or "").split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, (
        imported - set(sys.stdlib_module_names)
    )


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TIMM_LAYERATTN_CACHE": "{tmp}/explicit"},
        {"TIMM_LAYERATTN_CACHE": "~/tla-cache"},
        {"TIMM_LAYERATTN_CACHE": "", "XDG_CACHE_HOME": "{tmp}/xdg"},
        {"XDG_CACHE_HOME": "{tmp}/xdg"},
    ],
)
def test_cache_dir_agrees_with_the_package(
    env: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The installer's wheel cache is the package's cache folder (`timm_layerattn._utils.env.cache_dir`)."""
    package_env = _load(PACKAGE_ENV_PATH, "timm_layerattn_env_under_test")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("TIMM_LAYERATTN_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert im.default_cache_dir() == package_env.cache_dir()
    assert im.parse_args([]).cache_dir == package_env.cache_dir().absolute()


def test_makefile_runs_the_script() -> None:
    """`make test` (and so CI's `.ci/run`) installs the test stack through this script."""
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    rule = text[text.index("$(VENV)/.installed-test:"):].split("\n\n")[0]
    assert "scripts/install_mmcv.py" in rule.splitlines()[0]  # a prerequisite: edits re-run the install
    assert "$(BIN)/python scripts/install_mmcv.py" in rule


def test_ships_in_the_sdist(tmp_path: Path) -> None:
    """The sdist (what a source install starts from) carries the script, so the test stack installs from it."""
    pytest.importorskip("setuptools")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()
    src = tmp_path / "src"
    for rel in files:
        path = REPO / rel
        if path.is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(path), src / rel)
        elif path.is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / proc.stdout.split()[-1]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert "scripts/install_mmcv.py" in names
