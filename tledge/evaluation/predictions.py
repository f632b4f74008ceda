r"""``tledge evaluate --predictions FILE.csv``: one row per image, ``path,true,pred`` then one probability
column per class, named by the class. Valid UTF-8, always.

File names on Linux are bytes, and not every name is valid UTF-8 (a camera's Latin-1 ``caf\xe9.png``). The
``path`` column holds the name as text with two escapes, so the CSV stays valid UTF-8 and the name can be
recovered exactly: each byte that is not part of valid UTF-8 is written ``\xNN`` (two lower-case hex digits),
and a backslash in the name is written ``\\``. Every other name (any valid UTF-8) is written as it is.
:func:`path_from_csv` turns a ``path`` field back into the file's :class:`~pathlib.Path`::

    import csv
    from tledge.evaluation.predictions import path_from_csv
    for row in csv.DictReader(open("predictions.csv", encoding="utf-8", newline="")):
        path_from_csv(row["path"]).exists()   # True
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from tledge_runtime.fileio import atomic_write

RESERVED_COLUMNS = ("path", "true", "pred")
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def path_to_csv(path: Path) -> str:
    r"""``path`` as valid UTF-8 text: undecodable bytes as ``\xNN``, backslashes as ``\\`` (reversible)."""
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def path_from_csv(field: str) -> Path:
    """The file a ``path`` field of a predictions CSV names (the inverse of :func:`path_to_csv`)."""
    raw = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(field):
        raw += field[pos:m.start()].encode("utf-8")
        token = m.group(1)
        raw += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        pos = m.end()
    raw += field[pos:].encode("utf-8")
    return Path(os.fsdecode(bytes(raw)))


def write_predictions(path: Path, files: Sequence[Path], truth: np.ndarray, probs: np.ndarray,
                      labels: Sequence[str]) -> Path:
    """Write the CSV at ``path`` atomically: ``path,true,pred`` then one probability column per class.

    A class named like one of the first three columns gets its column as ``p(<name>)``. Probabilities
    keep 9 significant digits (float32 models differ from PyTorch in the 7th).
    """
    columns = [f"p({c})" if c in RESERVED_COLUMNS else c for c in labels]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # quotes fields with commas, quotes or newlines
    writer.writerow([*RESERVED_COLUMNS, *columns])
    for file, y, row in zip(files, truth, probs):
        writer.writerow([path_to_csv(Path(file)), labels[int(y)], labels[int(np.argmax(row))],
                         *(f"{v:.9g}" for v in row)])
    return atomic_write(path, buf.getvalue().encode("utf-8"))  # strict: the text above is valid UTF-8
