"""Checks of the values a model file's metadata holds: every size and string is bounded, nothing recurses.

A model file is untrusted input (it may arrive over the air). :mod:`tledge_runtime.model.meta` builds its
dataclasses through these checks, so a hostile document is a :class:`~tledge_runtime.errors.MetadataError`
with a hint, never a RecursionError, MemoryError or an escape sequence in someone's terminal.
"""

from __future__ import annotations

import math
import re
from typing import Any, NoReturn

from tledge_runtime.errors import MetadataError
from tledge_runtime.text import unsafe_chars

MAX_NAME_CHARS = 1024  # tensor names, architecture, versions, dates, quantization node names
MAX_LABEL_CHARS = 256


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # brackets inside strings do not nest
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, stop_after: int | None = None) -> int:
    """How deep the arrays/objects of a JSON text nest (0 for a scalar), without parsing it.

    Linear in the text and never recursive, so it is safe on any input; counting stops
    once ``stop_after`` is exceeded. Malformed text gives some number: json.loads refuses it next.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_after is not None and deepest > stop_after:
                    break
        else:
            depth -= 1
    return deepest


def not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_str(v: Any, max_chars: int) -> bool:
    return isinstance(v, str) and len(v) <= max_chars


def short(v: Any) -> str:
    """A value for an error message, cut short: the value came from an untrusted file."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(v: Any, what: str, *, empty_ok: bool = False) -> None:
    check(isinstance(v, str) and (empty_ok or v) and len(v) <= MAX_NAME_CHARS,
           f"{what} must be a {'' if empty_ok else 'non-empty '}string of at most {MAX_NAME_CHARS} characters")
    bad = unsafe_chars(v)
    check(not bad, f"{what} {short(v)} holds control characters ({', '.join(bad)})")


def check_label(i: int, label: str) -> None:
    check(0 < len(label) <= MAX_LABEL_CHARS, f"label {i} must have 1..{MAX_LABEL_CHARS} characters, "
                                              f"it has {len(label)}")
    # A label is printed by every CLI and server: an escape sequence in it would drive the reader's terminal.
    bad = unsafe_chars(label)
    check(not bad, f"label {i} {short(label)} holds control characters ({', '.join(bad)})")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check(ok: bool, message: str) -> None:
    if not ok:
        raise MetadataError(message, hint="fix the value, or re-export the model with `tledge export`")


def build(cls: type, d: Any, what: str) -> Any:
    """Construct a dataclass from a dict, rejecting unknown keys and wrong types with MetadataError."""
    if not isinstance(d, dict):
        raise MetadataError(f"metadata field {what!r} must be an object", hint="re-export the model with `tledge export`")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise MetadataError(f"unknown {what} metadata field(s) {short(unknown)}",
                            hint="this model was written by a newer tledge; upgrade tledge-runtime")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise MetadataError(f"malformed {what} metadata: {str(e)[:200]}",
                            hint="re-export the model with `tledge export`") from None
