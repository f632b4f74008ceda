"""Export errors. All are :class:`tledge_runtime.errors.TledgeError` subclasses with a hint, so
`tledge export` prints them as one line: exit status 1 for :class:`ExportFailed` (the export ran,
a format failed its check), 2 for the others (see :mod:`tledge_runtime.exits`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tledge_runtime.errors import CheckFailed, TledgeError


class ExportError(TledgeError):
    """An export cannot be made as asked: bad options, a model the exporter cannot trace, a broken graph."""


class EngineError(ExportError):
    """A TensorRT engine cannot be built here: no TensorRT, no GPU, or the parser/builder refused the graph."""


@dataclass(frozen=True)
class Failure:
    """One exported format that is not a success, with the numbers that say why and what to try."""

    format: str
    status: str  # "over_budget" | "unavailable" | "failed"
    message: str  # the numbers, e.g. "accuracy drop 6.67 points > budget 1.00 (...)"
    hint: str = ""


class ExportFailed(ExportError, CheckFailed):
    """Some formats were not written as successes (over budget, or a format unavailable here).

    Like Optimum's ``AtolError`` it lists each failing format with its numbers; the
    hint says what to try for each. Every format that passed was still written.
    """

    def __init__(self, failures: Sequence[Failure]):
        self.failures = tuple(failures)
        message = "; ".join(f"{f.format}: {f.message}" for f in self.failures)
        hints = []
        for f in self.failures:
            if f.hint and f.hint not in hints:
                hints.append(f.hint)
        super().__init__(message, hint="; ".join(hints) or None)


class ExportRefused(ExportError, CheckFailed):
    """The command-line form of :class:`ExportFailed`: one line saying what was written and what was refused (the
    numbers of each refusal are printed once, when it was decided), with what to try."""
