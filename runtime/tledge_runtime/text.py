"""Names from files and models, made safe to print and to write into line-based text files.

Labels, class-folder names and file names come from outside: a label holding
``"\\x1b]0;owned\\x07"`` retitles the terminal that prints it, a file name with a newline
splits one line of ``skipped.txt`` into two. :func:`printable` escapes every character
that could do that, the way Python's ``repr`` writes it, and leaves everything else
(accents, CJK, emoji) as it is. It is for people and line-based files, not a reversible
encoding: a literal backslash is kept as it is.

Unsafe characters: C0/C1 controls and DEL (``\\n``, ``\\t``, ``\\x1b``...), the Unicode
line and paragraph separators, the bidirectional overrides and isolates that reorder
what a reader sees ("Trojan Source"), and lone surrogates (a file name that is not
valid UTF-8, as Python decodes it), which are written back as ``\\xNN``, their byte.
"""

from __future__ import annotations

import re

_BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# One pass with a regex on the fast path: a name without any unsafe character is returned unchanged.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029" + _BIDI + "\ud800-\udfff]")


def unsafe_chars(text: str) -> list[str]:
    """The distinct unsafe characters of ``text``, escaped (for error messages), in order of appearance."""
    seen: list[str] = []
    for m in _UNSAFE.finditer(text):
        escaped = _escape(m)
        if escaped not in seen:
            seen.append(escaped)
    return seen


def printable(text: object) -> str:
    """``str(text)`` with every control, separator, bidi-override and surrogate character escaped."""
    return _UNSAFE.sub(_escape, str(text))


def printable_lines(text: object) -> str:
    """:func:`printable` for each line of a multi-line block (a table): its own newlines stay."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def _escape(m: re.Match) -> str:
    ch = m.group(0)
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the undecodable byte itself
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"
