"""Error types shared by the whole toolchain.

Every error tledge raises on purpose carries a ``hint``: one sentence that says how
to fix the problem. Both command lines print it as one line, ``error: <message> (<hint>)``,
and exit 1 for :class:`CheckFailed`, 2 for any other error; nothing else turns
exceptions into text.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class TledgeError(Exception):
    """Base class: a problem the user can fix, described in words, with a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ImageError(TledgeError):
    """An image could not be read or is not usable (missing, corrupt, too large, bad array).

    ``kind`` names the cause in one word so callers can count skipped files by reason:
    missing, empty, not_image, corrupt, too_large, unreadable, bad_array.
    """

    def __init__(self, message: str, hint: str | None = None, kind: str = "corrupt"):
        super().__init__(message, hint)
        self.kind = kind


class MetadataError(TledgeError):
    """A model file carries no tledge metadata, or metadata this version cannot read."""


class ModelError(TledgeError):
    """A model file is missing, unreadable, or its graph does not match its metadata."""


class BackendError(TledgeError):
    """The requested inference backend is not installed or cannot run this model here."""


class EngineBuildError(BackendError):
    """TensorRT's parser or builder refused a graph, or TensorRT (for RTX) is missing where a build was asked for."""


class CheckFailed(TledgeError):
    """The command ran and what it checked does not hold: an export over budget, a reference-set mismatch.

    The command lines exit with status 1 for it (2 for every other TledgeError: bad input, usage, environment).
    """


class SignatureError(CheckFailed):
    """A signed model folder does not verify: unsigned, a file that differs from what was signed, a file the
    signature does not cover, or a key that is not trusted here. Its message names the file or the key."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message in one line for an error message: the first line, cut at ``limit`` characters.

    Third-party libraries (onnxruntime, TensorRT, the exporters) raise multi-page messages; the user
    gets the line that says what failed, the log keeps the rest.
    """
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]


def import_optional(module: str, error: Callable[..., TledgeError], message: str, hint: str) -> Any:
    """``module`` imported, or ``error(message, hint=hint)`` raised when it (or a library it needs) does not import.

    The one shape of every optional-dependency guard. ``message`` may name the module that failed as
    ``{missing}`` and the import error as ``{reason}``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise error(message.format(missing=e.name or module, reason=e), hint=hint) from None
