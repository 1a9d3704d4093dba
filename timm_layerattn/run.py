"""`python -m timm_layerattn.run SCRIPT.py ...`: run a timm script with this plugin's models registered.

A short alias of `timm_layerattn.tools.run` (see there).
"""
import sys

from .tools.run import main, run_script

__all__ = ['main', 'run_script']

if __name__ == '__main__':
    sys.exit(main())
