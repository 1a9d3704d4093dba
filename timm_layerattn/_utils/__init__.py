"""Small shared utilities, one module per job (the bottom import layer: they know nothing of the package
beyond `version`):

* `errors`: `UserError` (reported by the CLI as one line), `Terminated`, `first_line`;
* `args`: checked command-line numbers (`int_arg`, `float_arg`, argparse types);
* `files`: atomic output (`atomic_dir`, `atomic_file`), output markers, writability checks, and the cleanup of
  temporary siblings left by killed runs or cut short by SIGTERM;
* `env`: the cache folder (`cache_dir`) and on/off environment switches (`env_switch`).

Code of the package imports from the job module; the names are also re-exported here.
"""
from .args import float_arg, int_arg
from .env import cache_dir, env_switch
from .errors import Terminated, UserError, first_line
from .files import (MARKER_KEY, atomic_dir, atomic_file, check_output_dir, check_writable, output_marker,
                    read_marker)

__all__ = ['UserError', 'first_line', 'Terminated', 'atomic_dir', 'atomic_file', 'cache_dir', 'check_output_dir',
           'check_writable', 'env_switch', 'int_arg', 'float_arg', 'output_marker', 'read_marker', 'MARKER_KEY']
