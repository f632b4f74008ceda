"""``device="auto"`` on a CPU: the fastest installed backend for this model on this machine, measured once.

Candidates are the CPU backends that run the model at the precision it was verified for (``ort-cpu``,
``openvino`` at f32; never ``openvino-bf16``). On the first start each candidate loads the model, must
pass the model's own reference check on the numerics (when the model carries a reference set), and is
timed on a few batch-1 runs; the fastest wins. The choice is cached in ``$TLEDGE_CACHE/auto/choices.json``
keyed by the model file's SHA-256, the machine (CPU model, cores) and the backends' versions, so later
starts read it (a hash and a small JSON file) instead of measuring. Every choice is explained in the log.

Where a GPU backend is usable the static order stands (``ort-tensorrt``, ``ort-cuda``): they are faster
than any CPU backend for these models, and the TensorRT EP's first engine build (tens of seconds) makes
measuring at start impractical. ``TLEDGE_AUTO_MEASURE=0`` turns measuring off (``ort-cpu`` on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tledge_runtime.backends.base import Opened
from tledge_runtime.backends.batching import pad_to
from tledge_runtime.errors import TledgeError
from tledge_runtime.fileio import atomic_write, cache_dir

log = logging.getLogger("tledge_runtime")

CPU_CANDIDATES = ("ort-cpu", "openvino")
MAX_CHOICES = 256  # models remembered per machine
WARMUP, RUNS = 3, 10  # batch-1 runs per candidate: enough to separate backends that differ by >10%
_VERSIONED = ("onnxruntime", "onnxruntime-gpu", "openvino")


def measuring_enabled() -> bool:
    return os.environ.get("TLEDGE_AUTO_MEASURE", "1") != "0"


def choose_cpu_backend(path: Path, usable: set[str], threads: Optional[int],
                       open_explicit: Callable[[str], Opened]) -> tuple[str, str]:
    """``(backend, why)`` for an ONNX file on this machine's CPU: cached, or measured now and cached.

    ``open_explicit(name)`` loads the model on one named backend (what :func:`tledge_runtime.backends.loader.open_backend`
    does with ``backend=name``): passed in, so choosing never imports the module that asks for the choice.
    """
    candidates = [name for name in CPU_CANDIDATES if name in usable]
    if len(candidates) <= 1 or not measuring_enabled():
        return "ort-cpu", "auto: ort-cpu" + ("" if measuring_enabled() else " (TLEDGE_AUTO_MEASURE=0)")
    key = _key(path, candidates, threads)
    cache = cache_dir("auto") / "choices.json"
    choices = _read(cache)
    if key in choices and choices[key].get("backend") in candidates:
        entry = choices[key]
        return entry["backend"], f"auto: cached choice, measured {entry['measured']}: {_times(entry['ms'])}"
    ms = {name: _measure(path, name, open_explicit) for name in candidates}
    passing = {name: t for name, t in ms.items() if t is not None}
    best = min(passing, key=passing.get) if passing else "ort-cpu"
    measured = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    choices[key] = {"backend": best, "ms": ms, "measured": measured, "model": path.name}
    kept = dict(list(choices.items())[-MAX_CHOICES:])  # the oldest choices go first: the file stays small
    atomic_write(cache, (json.dumps(kept, indent=1) + "\n").encode())
    return best, f"auto: measured now (batch 1, median of {RUNS}): {_times(ms)}; fastest {best}"


def _times(ms: dict[str, Any]) -> str:
    return ", ".join(f"{name} {t:.2f} ms" if t is not None else f"{name} failed its check" for name, t in ms.items())


def _measure(path: Path, backend: str, open_explicit: Callable[[str], Opened]) -> Optional[float]:
    """Median batch-1 milliseconds of ``backend`` on this model; None when it cannot load it or fails the check."""
    from tledge_runtime.check.replay import check_numerics, trace_references

    try:
        opened = open_explicit(backend)
    except TledgeError as e:
        log.warning("%s: auto leaves out %s: %s", path.name, backend, e.message)
        return None
    engine, meta = opened.backend, opened.meta

    def run_graph(x: np.ndarray) -> tuple[np.ndarray, Any]:
        out, scores = engine.run_scored(pad_to(x, engine.fixed_batch))
        return np.asarray(out)[: len(x)], None if scores is None else np.asarray(scores).reshape(-1)[: len(x)]

    try:
        if meta.reference_set is not None:
            verdict = check_numerics(meta, backend, run_graph, trace_references(meta, path.name)[0])
            if not verdict.ok:
                log.warning("%s: auto leaves out %s: %s", path.name, backend, verdict.detail)
                return None
        shape = [1 if d is None else d for d in engine.input_shape]
        x = np.zeros(shape, dtype=engine.input_dtype)
        for _ in range(WARMUP):
            run_graph(x)
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            run_graph(x)
            times.append(time.perf_counter() - t0)
        return round(1000 * statistics.median(times), 3)
    except TledgeError as e:
        log.warning("%s: auto leaves out %s: %s", path.name, backend, e.message)
        return None
    finally:
        engine.close()


def _key(path: Path, candidates: list[str], threads: Optional[int]) -> str:
    """Model content, machine and backend versions: a choice measured for one never applies to another."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    versions = []
    for dist in _VERSIONED:
        try:
            versions.append(f"{dist}={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            pass
    machine = f"{_cpu_model()}|{os.cpu_count()}|{platform.machine()}|threads={threads}"
    return "|".join([h.hexdigest()[:32], machine, ",".join(candidates), *versions])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _read(cache: Path) -> dict[str, Any]:
    """The cached choices; an unreadable or foreign cache is ignored (and rewritten on the next measure)."""
    try:
        if cache.stat().st_size > (1 << 20):
            return {}
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
