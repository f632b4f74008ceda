"""``tledge-runtime``: predict, info, check, build, verify and serve from the command line.

A thin map onto the Python API (argparse, so the device package needs nothing
more). Exit status and error line follow :mod:`tledge_runtime.exits`, the same as
``tledge``: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted, and every
error is one line on stderr, ``error: <message> (<hint>)``, never a traceback.
Labels, file names and metadata strings come from outside and are printed with their
control characters escaped. Logging (the backend choice, the server's address) goes
to stderr, results to stdout.

The parser is :mod:`.options`, the commands :mod:`.commands`, the entry point :func:`main` (:mod:`.main`).
"""

from tledge_runtime.cli.main import main

__all__ = ["main"]
