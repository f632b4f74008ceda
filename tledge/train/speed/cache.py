"""The training probe's measurements, kept per machine in ``$TLEDGE_CACHE/train/choices.json``.

One entry per key (CPU model and flags, cores, torch version, architecture, input size, batch): a later run on
the same machine reads what the first one measured instead of measuring again. The file is a cache, safe to
lose: one that is missing, unreadable, oversized or not what tledge writes is ignored, and the next
measurement rewrites it whole (the runtime's ``device="auto"`` cache works the same way).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tledge_runtime.fileio import atomic_write, cache_dir

log = logging.getLogger(__name__)

MAX_ENTRIES = 64  # keys remembered per machine; the oldest go first
MAX_BYTES = 1 << 20  # a bigger file is not one tledge wrote


def cache_file() -> Path:
    return cache_dir("train") / "choices.json"


def read_entry(key: str, path: Path | None = None) -> dict[str, Any] | None:
    """The entry cached for ``key``, or None (no file, another key, or a file that is not a valid cache)."""
    entry = _read_all(path or cache_file()).get(key)
    return entry if isinstance(entry, dict) else None


def write_entry(key: str, entry: dict[str, Any], path: Path | None = None) -> None:
    """Store ``entry`` under ``key`` (replacing any older one); a cache that cannot be written is only a warning."""
    path = path or cache_file()
    entries = _read_all(path)
    entries.pop(key, None)
    entries[key] = entry
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        atomic_write(path, (json.dumps(kept, indent=1, sort_keys=False) + "\n").encode())
    except OSError as e:
        log.warning("could not write the training probe's cache %s: %s (the next run measures again)", path, e)


def _read_all(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_BYTES:
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
