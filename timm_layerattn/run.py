"""Run a timm script (validate.py, inference.py, benchmark.py, train.py, ...) with this plugin's models registered.

    python -m timm_layerattn.run path/to/validate.py /data/imagenet --model resnet50_kcla --pretrained
    torchrun --nproc_per_node 4 -m timm_layerattn.run path/to/train.py /data/imagenet --model resnet50_kcla

timm's scripts create models by name from timm's registry, which knows nothing of plugins. `train.py` can import
the plugin itself (`--device-modules timm_layerattn`), but `validate.py`, `inference.py` and `benchmark.py` have no
such flag. This wrapper imports `timm_layerattn` (registering every model), then runs the script exactly as
`python script.py args...` would: as `__main__`, with `sys.argv` = [script, args...] and the script's folder first
on `sys.path`. Because timm is imported before the script runs, a `timm/` folder next to the script (a source
clone) cannot shadow the installed timm.
"""
import os
import runpy
import sys
from typing import List, Optional

__all__ = ['run_script', 'main']

USAGE = 'usage: python -m timm_layerattn.run SCRIPT.py [script arguments...]'


def run_script(script: str, script_args: List[str]) -> None:
    """Import the plugin, then execute `script` as `__main__` with `script_args` (SystemExit propagates)."""
    import timm_layerattn  # noqa: F401  (registers the models with timm)
    path = os.path.abspath(script)
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name='__main__')


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m timm_layerattn.run`: usage errors (no script, not a .py file) exit with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE + '\n\n' + __doc__.split('\n\n', 1)[0], file=sys.stderr if not argv else sys.stdout)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f'timm_layerattn.run: error: script not found: {script}', file=sys.stderr)
        return 2
    if not script.endswith('.py'):
        print(f'timm_layerattn.run: error: expected a Python script (.py), got {script}', file=sys.stderr)
        return 2
    run_script(script, argv[1:])
    return 0


if __name__ == '__main__':
    sys.exit(main())
