"""One exit-status and error-line convention for both command lines, ``tledge`` and ``tledge-runtime``.

====  =====================================================================================
0     ok
1     the command ran and a check it made failed (:class:`~.errors.CheckFailed`: a format
      over its accuracy budget in ``tledge export``, a reference-set mismatch)
2     bad input, usage or environment: any other tledge error (a missing or corrupt file,
      a model the runtime refuses, a backend not installed), a bad option or argument
130   interrupted (Ctrl-C / SIGINT)
====  =====================================================================================

Every error is one line on stderr, ``error: <message> (<hint>)``, with control characters
escaped (a file or class name must not drive the reader's terminal); a user error never
shows a traceback. Scripts can tell "the model is not good enough" (1) from "this could
not be run" (2).
"""

from __future__ import annotations

from tledge_runtime.errors import CheckFailed, TledgeError
from tledge_runtime.text import printable

OK = 0
CHECK_FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130


def exit_status(error: BaseException) -> int:
    """The exit status for an error that ends a command."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, CheckFailed):
        return CHECK_FAILED
    return BAD_INPUT


def error_line(message: str, hint: str | None = None) -> str:
    """``error: <message> (<hint>)``, printable on any terminal."""
    return printable(f"error: {message}" + (f" ({hint})" if hint else ""))


def tledge_error_line(error: TledgeError) -> str:
    return error_line(error.message, error.hint)
