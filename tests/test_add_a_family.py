"""A new family needs no edit to an existing file: docs/add_a_family.md's worked example (`_family_example.py`)
registers, builds, takes its kwargs and loads checkpoints through the generic machinery alone.

It runs in a fresh interpreter so the example family never joins the registry the other tests see.
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

_RUN = '''
import inspect, sys, tempfile
from pathlib import Path
import _family_example as example
checks = [f for name, f in vars(example).items() if name.startswith('check_the') or name.startswith('check_its')]
assert len(checks) == 3, checks
for check in checks:
    with tempfile.TemporaryDirectory() as tmp:
        args = [Path(tmp)] if inspect.signature(check).parameters else []
        check(*args)
    print('ok', check.__name__)
'''


def test_worked_example_family_runs_on_the_generic_machinery():
    result = subprocess.run([sys.executable, '-c', _RUN], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('ok check_') == 3
