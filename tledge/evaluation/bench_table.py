"""What `tledge benchmark` reports: one :class:`Row` per format and backend, the table people read, the one-line
recommendation, the machine the numbers came from, and the files it leaves in the run folder (Markdown, JSON)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tledge_runtime.fileio import atomic_write


@dataclass
class Row:
    name: str
    precision: str
    backend: str
    size_mb: Optional[float] = None
    accuracy: Optional[float] = None
    delta_points: Optional[float] = None  # accuracy minus PyTorch's, in percentage points
    interval: Optional[tuple[float, float]] = None  # paired 95% interval of delta_points
    agreement: Optional[float] = None  # % of images where top-1 equals PyTorch's top-1
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    throughput: Optional[float] = None  # images/s at the large batch
    check: str = "-"  # the model's reference check on this backend: ok | differs (stage) | - (no reference set)
    status: str = "ok"  # ok | over budget | failed | missing | check failed
    reason: str = ""

    def fastest_key(self) -> float:
        return self.p50_ms if self.p50_ms is not None else float("inf")


@dataclass
class BenchResult:
    rows: list[Row]
    images: int
    skipped: int
    batch: int
    preprocess_ms: float
    machine: dict[str, Any]
    recommendation: str = ""
    reference: str = ""
    plot: Optional[Path] = None
    saved: list[Path] = field(default_factory=list)  # benchmark.md, benchmark.json beside the plot

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plot"] = str(self.plot) if self.plot else None
        d["saved"] = [str(p) for p in self.saved]
        return d


def recommend(rows: Sequence[Row], budgets: dict[str, float]) -> str:
    """The fastest format within its accuracy budget on this machine, in one line."""
    ok = [r for r in rows if r.status == "ok" and r.p50_ms is not None]
    if not ok:
        return "no format ran within its accuracy budget"
    best = min(ok, key=Row.fastest_key)
    base = next((r for r in rows if r.backend == "pytorch-eager" and r.p50_ms), None)
    speed = f", {base.p50_ms / best.p50_ms:.1f}x faster than PyTorch" if base and best is not base else ""
    delta = f" ({best.delta_points:+.2f} points vs PyTorch)" if best.delta_points is not None else ""
    return (f"ship {best.name} on {best.backend}: {best.p50_ms:.2f} ms p50 at batch 1{speed}; "
            f"accuracy {100 * best.accuracy:.2f}%{delta}")


def to_markdown(result: BenchResult) -> str:
    """The table people read: one row per format and backend."""
    head = ("| model | precision | backend | size MB | accuracy | Δ pts [95%] | agreement | check | p50 ms | p99 ms | "
            f"img/s @{result.batch} | status |")
    lines = [head, "|" + "---|" * 12]
    for r in result.rows:
        cells = [r.name, r.precision, r.backend, _f(r.size_mb, 1), _f(r.accuracy, 2, 100, "%"),
                 _delta(r), _f(r.agreement, 1, suffix="%"), r.check, _f(r.p50_ms, 2),
                 _f(r.p99_ms, 2), _f(r.throughput, 1), r.status + (f": {r.reason}" if r.reason else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta(r: Row) -> str:
    if r.delta_points is None:
        return "-"
    return f"{r.delta_points:+.2f}" + ("" if not r.interval else " [{:+.2f}, {:+.2f}]".format(*r.interval))


def _f(v: Optional[float], digits: int, scale: float = 1.0, suffix: str = "", sign: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v * scale:{'+' if sign else ''}.{digits}f}{suffix}"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, instruction sets and library versions: results mean nothing without them."""
    import importlib.metadata as md

    cpu, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx512_vnni", "avx512f", "avx2", "amx", "avx_vnni", "avx512_bf16")))
    versions = {}
    for pkg in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy", "tledge"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "machine": platform.machine(),
            "python": platform.python_version(), "versions": versions, "date": time.strftime("%Y-%m-%d")}


def save(result: BenchResult, plot: Path) -> tuple[Path, Path]:
    """The table (Markdown, with the recommendation and the machine) and the whole result (JSON), written
    atomically beside ``plot``: ``benchmark.md`` and ``benchmark.json`` for ``benchmark.png``."""
    m = result.machine
    text = (f"{result.images} images ({result.skipped} skipped); reference: {result.reference or 'none'}; "
            f"{m['cpu']}, {m['cores']} cores, {m['date']}\n\n{to_markdown(result)}\n\n"
            f"recommendation: {result.recommendation}\n")
    md = atomic_write(plot.with_suffix(".md"), text.encode("utf-8"))
    js = atomic_write(plot.with_suffix(".json"), (json.dumps(result.to_dict(), indent=2, default=str) + "\n").encode())
    return md, js
