"""``check_model``: the reference check of a model file on one or more backends (``tledge-runtime check``).

The comparison itself is :mod:`tledge_runtime.check.replay`; this module opens the file on each backend."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from tledge_runtime.backends.loader import backends_for, read_meta
from tledge_runtime.check.replay import BackendCheck, CheckReport, check_numerics, reference_set_of, trace_references
from tledge_runtime.classifier import Classifier
from tledge_runtime.errors import TledgeError


def check_model(path: str | Path, backends: Sequence[str] = ("auto",), *, device: str = "auto",
                threads: Optional[int] = None) -> CheckReport:
    """Replay the reference set of the model at ``path`` on each of ``backends`` (``"all"``: every backend
    that can run this file here). Never raises for a mismatch: read :attr:`CheckReport.ok`."""
    path = Path(path)
    meta = read_meta(path)
    traces, stages = trace_references(meta, path.name)
    refs = reference_set_of(meta, path.name)
    report = CheckReport(path.name, len(refs.items), refs.images, stages)
    names = backends_for(path) if list(backends) == ["all"] else list(backends)
    for name in names:
        try:
            with Classifier(path, device=device, backend=None if name == "auto" else name, threads=threads) as clf:
                report.backends.append(check_numerics(clf.meta, clf.backend_name, clf.run_graph_scored, traces))
        except TledgeError as e:
            report.backends.append(BackendCheck(name, False, f"could not load: {e.message}"))
    return report
