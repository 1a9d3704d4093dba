"""User-facing errors: what the command line reports as one line, without a traceback."""
from typing import Optional

__all__ = ['UserError', 'Terminated', 'first_line']


class UserError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class Terminated(SystemExit):
    """SIGTERM (or an unhandled SIGINT) arrived while an atomic output was open (`files.atomic_dir`).

    A `SystemExit` (exit status 128 + signal number), so `except Exception` blocks let it through while
    the atomic writers' cleanup (`except BaseException`) still runs.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def first_line(e: BaseException, default: Optional[str] = None, limit: int = 200) -> str:
    """The first line of `e`'s message, cut to `limit` characters, for one-line error reports.

    An empty message gives `default`, or the exception's type name.
    """
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else (default if default is not None else type(e).__name__)
    return line if len(line) <= limit else line[:limit - 3] + '...'
