"""The entry point of ``tledge-runtime``: argument errors and every TledgeError as one line, logging to stderr."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn, Sequence

from tledge_runtime import __version__, exits
from tledge_runtime.cli.options import add_commands
from tledge_runtime.errors import TledgeError
from tledge_runtime.text import printable_lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        _log_to_stderr(logging.WARNING if args.quiet else logging.INFO)
        return args.run(args)
    except TledgeError as e:
        print(exits.tledge_error_line(e), file=sys.stderr)
        return exits.exit_status(e)
    except KeyboardInterrupt:
        print(exits.error_line("interrupted"), file=sys.stderr)
        return exits.INTERRUPTED
    except BrokenPipeError:  # `tledge-runtime predict ... | head`: the reader left, nothing is wrong
        return exits.OK

class _Parser(argparse.ArgumentParser):
    """argparse with tledge's error line: ``error: <message> (see `<command> --help`)``, exit status 2.

    (argparse's own prints the whole usage block first; sub-command parsers inherit this class.)
    """

    def error(self, message: str) -> NoReturn:
        self.exit(exits.BAD_INPUT, exits.error_line(message, f"see `{self.prog} --help`") + "\n")

class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (the CLI may run many times in one process, as in tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(printable_lines(self.format(record)), file=sys.stderr)  # messages carry file names

def _log_to_stderr(level: int) -> None:
    # Only tledge_runtime's own messages; other libraries' INFO chatter stays off.
    logger = logging.getLogger("tledge_runtime")
    logger.setLevel(level)
    logger.propagate = False
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())

def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tledge-runtime", description="Run tledge-exported image classifiers.",
                     epilog="Exit status: 0 ok, 1 a check failed, 2 bad input or usage, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"tledge-runtime {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_commands(sub)
    return parser
