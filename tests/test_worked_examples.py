"""The worked examples of docs/add_a_family.md and docs/add_a_trunk.md, executed: a new family (DepthSE,
`_family_example.py`) and a new trunk hosting an existing strategy (`_trunk_example.py`) work through the
generic machinery alone, with no edit to any file of the package.

Each example runs in a fresh interpreter, so its models never join the registry the other tests see; its
`check_*` functions are the assertions.
"""
import subprocess
import sys
from pathlib import Path

import pytest

_RUN = '''
import importlib, inspect, sys, tempfile
from pathlib import Path
example = importlib.import_module(sys.argv[1])
checks = [f for name, f in vars(example).items()
          if name.startswith('check_') and getattr(f, '__module__', None) == example.__name__]
assert checks, 'no checks'
for check in checks:
    with tempfile.TemporaryDirectory() as tmp:
        check(*([Path(tmp)] if inspect.signature(check).parameters else []))
    print('ok', check.__name__)
print('checks', len(checks))
'''


@pytest.mark.parametrize('example', ['_family_example', '_trunk_example'])
def test_worked_example_runs_on_the_generic_machinery(example):
    result = subprocess.run([sys.executable, '-c', _RUN, example], cwd=Path(__file__).parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = int(result.stdout.split('checks ')[-1])
    assert ran >= 3 and result.stdout.count('ok check_') == ran
