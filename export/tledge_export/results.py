"""What an export produced: one :class:`FormatResult` per format, the table, report.json, the verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tledge_export.artifact import write_file
from tledge_export.config import FILE_NAMES
from tledge_export.errors import ExportFailed, ExportRefused, Failure
from tledge_export.verify.compare import row, table
from tledge_runtime.model.verification import Verification

STATUS_WORDS = {"ok": "ok", "over_budget": "OVER BUDGET", "unavailable": "unavailable", "failed": "FAILED"}


@dataclass
class FormatResult:
    """One format: written (``status="ok"``) or not, with its parity numbers and why."""

    format: str  # fp32 | fp16 | int8 | int8-trt | fp16-engine | int8-trt-engine ...
    status: str  # ok | over_budget | unavailable | failed
    path: Optional[Path] = None  # the file written (None unless status is ok)
    parity: Optional[Verification] = None
    size_bytes: Optional[int] = None
    message: str = ""  # why it is not ok, with numbers
    hint: str = ""  # what to try
    details: dict[str, Any] = field(default_factory=dict)  # quantization, float nodes, TensorRT checks, ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "status": self.status, "file": self.path.name if self.path else None,
                "file_name": FILE_NAMES.get(self.format),  # what it is called when written (the runtime reads it)
                "bytes": self.size_bytes, "verification": self.parity.to_dict() if self.parity else None,
                "message": self.message, "hint": self.hint, **self.details}


@dataclass
class ExportResult:
    """Everything an export wrote and measured. ``ok`` is False when any asked-for format is not a success."""

    out: Path
    formats: list[FormatResult]
    report: Path
    summary: dict[str, Any] = field(default_factory=dict)  # images, checkpoint, config: the report's header
    triton: Optional[Path] = None
    signed_by: Optional[str] = None  # fingerprint of the key that signed the folder (--sign-key), else None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.formats)

    def get(self, fmt: str) -> FormatResult:
        """The result of one format, by name (KeyError when it was not asked for)."""
        for f in self.formats:
            if f.format == fmt:
                return f
        raise KeyError(fmt)

    def failures(self) -> list[Failure]:
        return [Failure(f.format, f.status, f.message, f.hint) for f in self.formats if not f.ok]

    def raise_for_failures(self) -> None:
        """Raise :class:`ExportFailed` listing every format that is over budget or unavailable."""
        failures = self.failures()
        if failures:
            raise ExportFailed(failures)

    def summary_line(self) -> str:
        """One line: what was written and what was refused (the reasons are in the log lines and report.json)."""
        written = [f.path.name for f in self.formats if f.ok and f.path]
        extras = [self.report.name] + (["triton/"] if self.triton else [])
        line = f"wrote {', '.join(written) or 'no model'} (+ {', '.join(extras)}) to {self.out}"
        refused = [f"{f.format} ({STATUS_WORDS[f.status].lower()})" for f in self.formats if not f.ok]
        return (f"refused {', '.join(refused)}; " if refused else "") + line

    def raise_for_refusals(self) -> None:
        """A one-line :class:`ExportRefused` (exit status 1) when a format was refused: the summary, and what to
        try; the numbers were said once, when each format was decided (log) and are in report.json."""
        failures = self.failures()
        if failures:
            hints = list(dict.fromkeys(f.hint for f in failures if f.hint))
            raise ExportRefused(self.summary_line(), hint="; ".join(hints) or f"see {self.report}")

    def table(self) -> str:
        return table([row(f.format, f.path.name if f.path else "", f.size_bytes, f.parity, STATUS_WORDS[f.status])
                      for f in self.formats])

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary, "out": str(self.out), "ok": self.ok, "formats": [f.to_dict() for f in self.formats],
                "triton": str(self.triton) if self.triton else None}

    def write_report(self) -> Path:
        write_file(self.report, (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
        return self.report
