"""What every `tledge` command shares: the error convention, logging to stderr, printing names safely.

Errors the user can fix (:class:`~tledge.errors.TledgeError`) become one-line messages in one place
(:class:`Group`); anything else is a bug and keeps its traceback. Exit status and error line are those
of ``tledge-runtime`` (:mod:`tledge_runtime.exits`): 0 ok, 1 a check failed (an export over budget),
2 bad input, usage or environment, 130 interrupted; ``error: <message> (<hint>)`` on stderr. Names that
come from files (classes, paths) are printed with control characters escaped.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Optional

import click

from tledge_runtime import exits
from tledge_runtime.errors import TledgeError
from tledge_runtime.text import printable_lines

HELP = dict(help_option_names=["-h", "--help"], max_content_width=100)


class _Failed(click.ClickException):
    """A tledge error on its way out of Click, keeping the status :mod:`tledge_runtime.exits` gives it."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line)
        self.line, self.exit_code = line, exit_code


class Group(click.Group):
    """Click group that prints every error as one line, `error: <message> (<hint>)`, and exits with
    the status of :mod:`tledge_runtime.exits` (1 a check failed, 2 bad input or usage, 130 interrupted)."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(args, prog_name, **kwargs)
        try:
            return super().main(args, prog_name, standalone_mode=False, **kwargs)
        except _Failed as e:
            click.echo(e.line, err=True)
            sys.exit(e.exit_code)
        except TledgeError as e:  # raised while Click parsed the options (a callback), outside invoke()
            click.echo(exits.tledge_error_line(e), err=True)
            sys.exit(exits.exit_status(e))
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "tledge"
            click.echo(exits.error_line(e.format_message(), f"see `{command} --help`"), err=True)
            sys.exit(exits.BAD_INPUT)
        except click.ClickException as e:  # e.g. a file Click could not open: bad input, like a usage error
            click.echo(exits.error_line(e.format_message()), err=True)
            sys.exit(exits.BAD_INPUT)
        except click.Abort:  # Click's word for Ctrl-C (or end of input) outside a command's own code
            click.echo(exits.error_line("interrupted"), err=True)
            sys.exit(exits.INTERRUPTED)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TledgeError as e:
            raise _Failed(exits.tledge_error_line(e), exits.exit_status(e)) from None
        except KeyboardInterrupt:
            raise _Failed(exits.error_line("interrupted", "files written so far are complete; an interrupted "
                                           "finetune continues with --resume --out RUN"), exits.INTERRUPTED) from None


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the one at set-up.

    A handler that kept the stream it was created with would, after a second ``main()`` in the
    same process (an embedding app, Click's test runner), write to a stream nobody reads.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


class _PrintableFormatter(logging.Formatter):
    """The house format: information plainly, ``warning: ...`` and ``error: ...`` for what went wrong (the prefix of
    error lines the commands print themselves); names from files with control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            text = "error: " + text
        elif record.levelno >= logging.WARNING:
            text = "warning: " + text
        return printable_lines(text)


# Every tledge package logs; the CLI shows all of them in one voice (no "ERROR:tledge_export.steps:" prefixes).
# The runtime's own information lines (backend chosen, reference check passed) are its CLI's business: here only
# its warnings and errors show.
LOGGERS = {"tledge": logging.INFO, "tledge_export": logging.INFO, "tledge_runtime": logging.WARNING}


def setup_logging(quiet: bool = False) -> None:
    """Core modules log; the CLI prints those lines plainly on stderr."""
    for name, level in LOGGERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(h, _CurrentStderrHandler) for h in logger.handlers):
            handler = _CurrentStderrHandler()
            handler.setFormatter(_PrintableFormatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(max(level, logging.WARNING) if quiet else level)
        # Libraries that call logging.info() at module level give the root logger a handler of its own
        # (logging.basicConfig); without this every tledge line would then print twice.
        logger.propagate = False


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))  # json.dumps escapes control characters itself


def echo(text: Any) -> None:
    """``click.echo`` for lines that hold names from files (classes, paths): control characters escaped."""
    click.echo(printable_lines(text))




def config_option(default_of: Callable[[str], Any]) -> Callable[..., Callable]:
    """``option(*decls, field=..., **kwargs)``: a Click option for one field of a config dataclass, with that
    field's default (``default_of(field)``): the config is the one source of every default the CLI shows."""
    def option(*decls: str, field: str, **kwargs: Any) -> Callable:
        value = default_of(field)
        return click.option(*decls, field, default=value, show_default=value not in (None, False), **kwargs)

    return option
