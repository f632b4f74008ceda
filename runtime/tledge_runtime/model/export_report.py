"""Why a model file is absent: the ``report.json`` that ``tledge export`` writes beside its models says which
formats it refused and why. The runtime reads it only to explain a missing file; it is untrusted input like any
file, read bounded and never trusted for anything else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tledge_runtime.text import printable

REPORT_NAME = "report.json"
MAX_REPORT_BYTES = 4 << 20  # a real report is a few hundred KB at most (accuracy-aware attempts, rankings)


def why_absent(path: Path) -> Optional[str]:
    """``"tledge export refused it: <reason>"`` when the report beside ``path`` names its format as not written;
    None when there is no such report or it says nothing about this file."""
    report = path.parent / REPORT_NAME
    try:
        if not report.is_file() or report.stat().st_size > MAX_REPORT_BYTES:
            return None
        formats = json.loads(report.read_bytes()).get("formats", [])
    except (OSError, ValueError, AttributeError):
        return None
    for entry in formats if isinstance(formats, list) else []:
        if isinstance(entry, dict) and entry.get("file_name") == path.name and entry.get("status") != "ok":
            reason = str(entry.get("message") or entry.get("status"))[:400]
            return f"tledge export refused it ({printable(str(entry.get('status')))}): {printable(reason)}"
    return None
