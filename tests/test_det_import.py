"""`timm_layerattn.det` without a working MMDetection: a clear error, and the installer still runs.

Runs whether or not MMDetection is installed: a stand-in `mmdet` package that fails to import is put first
on the path of a child interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.det

INSTALLER = Path(__file__).resolve().parents[1] / 'scripts' / 'install_mmcv.py'


@pytest.fixture()
def broken_mmdet_env(tmp_path):
    pkg = tmp_path / 'mmdet'
    pkg.mkdir()
    (pkg / '__init__.py').write_text("raise ImportError(\"No module named 'mmcv'\", name='mmcv')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')])))


def test_import_without_mmdet_names_the_fix(broken_mmdet_env):
    proc = subprocess.run([sys.executable, '-c', 'import timm_layerattn.det'], env=broken_mmdet_env,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError: timm_layerattn.det needs MMDetection'), last
    assert "No module named 'mmcv'" in last
    assert 'python scripts/install_mmcv.py' in last and 'timm-layerattn[mmdet]' in last


def test_installer_runs_before_mmdet_exists(broken_mmdet_env):
    proc = subprocess.run([sys.executable, str(INSTALLER), '--help'],
                          env=broken_mmdet_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'usage: python scripts/install_mmcv.py' in proc.stdout
