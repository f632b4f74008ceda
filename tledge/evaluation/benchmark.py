"""`tledge benchmark`: every format of a run on the same images, one table that says which to ship.

For the PyTorch checkpoint and each exported model (through :class:`tledge_runtime.Classifier`,
so the numbers are the ones a device sees): file size, accuracy, accuracy delta against
PyTorch in points, top-1 agreement with PyTorch, p50/p99 latency at batch 1 and throughput
at a larger batch, and a status per row. A format that is missing, over its accuracy
budget, or fails on a backend is a row that says so, never a crash.

Latency is the model call on a prepared (decoded, resized) image: normalisation plus
inference, the same work for every row, PyTorch included. Decoding and resizing cost the
same for every format and are reported once, as ``preprocess_ms``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tledge.data.folders import stratified_sample
from tledge.data.imagecache import decode_images, summarize_skipped
from tledge.errors import ConfigError, DataError
from tledge.evaluation.bench_table import BenchResult, Row, machine_info, recommend
from tledge.evaluation.evaluate import evaluation_samples
from tledge.progress import progress
from tledge_export.config import FILE_NAMES, FP16_BUDGET, INT8_BUDGET
from tledge_runtime.errors import TledgeError, first_line
from tledge_runtime.model.meta import ModelMeta, Preprocess

log = logging.getLogger(__name__)

# Accuracy budgets in points, by precision: export's own (fp32 must match, to fp16's 0.1 point).
DEFAULT_BUDGETS = {"fp32": FP16_BUDGET, "fp16": FP16_BUDGET, "int8": INT8_BUDGET}
# The files `tledge export` writes by default; absent ones are listed as "missing" rows.
STANDARD_FILES = {FILE_NAMES[p]: p for p in ("fp32", "fp16", "int8")}
MODEL_SUFFIXES = (".onnx", ".engine")


@dataclass
class _Inputs:
    checkpoint: Optional[Path]
    models: list[Path]
    missing: list[tuple[str, str, str]] = field(default_factory=list)  # (file name, precision, why)


def _not_exported(precision: str) -> str:
    return "not exported; run `tledge export" + ("`" if precision == "fp32" else f" --{precision}`")


def _refused_formats(report: Path) -> dict[str, str]:
    """Formats the export's report.json says it refused (over budget, failed), with its reason.

    Only a hint for the "missing" rows: an unreadable or foreign report is ignored.
    """
    try:
        formats = json.loads(report.read_text())["formats"]
        return {f["format"]: (f"refused by tledge export ({str(f['status']).replace('_', ' ')}): "
                              f"{f.get('message') or 'see report.json'}")
                for f in formats if isinstance(f, dict) and f.get("status") not in (None, "ok")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def discover(paths: Sequence[Path]) -> _Inputs:
    """Find the checkpoint and model files in run folders, export folders, or explicit files."""
    found = _Inputs(None, [])
    for path in map(Path, paths):
        if path.is_file():
            if path.suffix == ".pt":
                found.checkpoint = path
            elif path.suffix in MODEL_SUFFIXES:
                found.models.append(path)
            else:
                raise ConfigError(f"{path}: not a checkpoint (.pt) or model (.onnx, .engine)",
                                  hint="pass a run folder, an export folder, or model files")
            continue
        if not path.is_dir():
            raise ConfigError(f"{path}: no such file or folder", hint="pass a run folder, an export folder, or model files")
        export = path / "export" if (path / "export").is_dir() else path
        for candidate in (path / "best.pt", path.parent / "best.pt"):
            if found.checkpoint is None and candidate.is_file():
                found.checkpoint = candidate
        models = sorted(p for p in export.iterdir() if p.suffix in MODEL_SUFFIXES and not p.name.startswith("."))
        found.models += models
        names = {p.name for p in models}
        refused = _refused_formats(export / "report.json")
        found.missing += [(n, prec, refused.get(prec) or _not_exported(prec))
                          for n, prec in STANDARD_FILES.items() if n not in names]
    if found.checkpoint is None and not found.models:
        raise ConfigError("nothing to benchmark: no best.pt and no .onnx/.engine files found",
                          hint="pass a run folder (runs/exp), its export folder, or model files")
    return found


def benchmark(paths: Sequence[Path], data: Path, *, backends: Sequence[str] = ("auto",), batch: int = 8,
              warmup: int = 5, iters: int = 50, budgets: Optional[dict[str, float]] = None, threads: Optional[int] = None,
              max_images: Optional[int] = None, plot: Optional[Path] = None) -> BenchResult:
    """Measure every format found in ``paths`` on the images of ``data``; see the module docstring."""
    budgets = {**DEFAULT_BUDGETS, **(budgets or {})}
    found = discover(paths)
    metas = {m: _read_meta(m) for m in found.models}
    ckpt = None
    if found.checkpoint is not None:
        from tledge.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(found.checkpoint)
    labels, prep = _contract(ckpt, metas)
    folder, samples = evaluation_samples(data, labels)
    if max_images:
        samples = stratified_sample(samples, max_images)
    decoded = decode_images(samples, prep, desc="decode")
    if len(decoded) == 0:
        raise DataError(f"{folder}: none of the {len(samples)} images could be read", hint="check the images")
    if decoded.skipped:
        log.warning(summarize_skipped(decoded.skipped, len(samples)))
    images, y = decoded.images, decoded.labels
    pre_ms = _preprocess_ms(decoded.paths[: min(20, len(decoded))], prep)
    result = BenchResult([], len(decoded), len(decoded.skipped), batch, pre_ms, machine_info())

    reference_pred = None
    preds: list[Optional[np.ndarray]] = []  # top-1 predictions, aligned with result.rows
    if ckpt is not None:
        row, reference_pred = _torch_row(ckpt, found.checkpoint, images, y, batch, warmup, iters, threads)
        result.rows.append(row)
        preds.append(reference_pred)
        result.reference = "PyTorch (best.pt)"
    for path in progress(found.models, desc="benchmark", unit="model"):
        for backend in _backends_for(path, backends):
            row, pred = _runtime_row(path, metas[path], backend, images, y, prep, batch, warmup, iters, threads)
            if reference_pred is None and pred is not None and row.precision == "fp32":
                reference_pred, result.reference = pred, f"{path.name} ({row.backend})"
            result.rows.append(row)
            preds.append(pred)
    for name, precision, why in found.missing:
        result.rows.append(Row(name, precision, "-", status="missing", reason=why))
        preds.append(None)
    _compare(result.rows, preds, reference_pred, y, budgets)
    result.recommendation = recommend(result.rows, budgets)
    if plot is not None:
        from tledge.evaluation.bench_table import save
        from tledge.report.plots import plot_pareto

        result.plot = plot_pareto(result.rows, plot)
        result.saved = list(save(result, plot))
    return result


def _contract(ckpt: Optional[dict], metas: dict[Path, Any]) -> tuple[list[str], Preprocess]:
    """Labels and geometry every model of the comparison must share."""
    sources = []
    if ckpt is not None:
        from tledge.train.checkpoint import preprocess_of

        sources.append(("best.pt", list(ckpt["labels"]), preprocess_of(ckpt)))
    sources += [(p.name, list(m.labels), m.preprocess) for p, m in metas.items() if isinstance(m, ModelMeta)]
    if not sources:
        raise ConfigError("none of the models has readable tledge metadata", hint="re-export them with `tledge export`")
    _, labels, prep = sources[0]
    for name, other_labels, other_prep in sources[1:]:
        geometry = (other_prep.height, other_prep.width, other_prep.resize, other_prep.crop_ratio, other_prep.interpolation)
        if other_labels != labels or geometry != (prep.height, prep.width, prep.resize, prep.crop_ratio, prep.interpolation):
            raise ConfigError(f"{name} has other labels or another input geometry than {sources[0][0]}",
                              hint="benchmark the formats of one model at a time")
    return labels, prep


def _read_meta(path: Path) -> Any:
    """The model's metadata, or the error that refuses it (reported as a failed row)."""
    try:
        if path.suffix == ".engine":
            from tledge_runtime.backends.engine_file import read_engine_meta

            return read_engine_meta(path)
        from tledge_runtime.backends.loader import read_meta

        return read_meta(path)
    except TledgeError as e:
        return e


def _backends_for(path: Path, backends: Sequence[str]) -> list[str]:
    if path.suffix == ".engine":
        return ["tensorrt"]
    chosen = [b for b in backends if b != "tensorrt"]
    return chosen or ["auto"]


def _torch_row(ckpt, path, images, y, batch, warmup, iters, threads) -> tuple[Row, np.ndarray]:
    """PyTorch eager fp32 on the CPU: the reference every other row is compared with, deciding with the run's
    answers (calibration temperature, operating point) exactly as the exported models do."""
    import torch

    from tledge.train.checkpoint import model_from_checkpoint, preprocess_of
    from tledge.train.transforms import Normalize
    from tledge_runtime.answers.decision import decide, probabilities
    from tledge_runtime.model.answers import Answers

    model = model_from_checkpoint(ckpt)
    norm = Normalize(preprocess_of(ckpt))
    answers = Answers.from_dict(ckpt["answers"]) if ckpt.get("answers") else Answers()

    def decided(logits: np.ndarray) -> np.ndarray:
        return decide(probabilities(logits, answers.temperature), ckpt["labels"], answers.operating_point)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(norm(torch.from_numpy(x))).numpy()

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:  # --threads for this row only: the process (a notebook, a test run) keeps its own setting
        pred = _predict_all(run, decided, images, batch)
        row = Row(path.name, "fp32", "pytorch-eager", size_mb=path.stat().st_size / 1e6, accuracy=_acc(pred, y))
        _time(row, run, images, batch, warmup, iters)
    finally:
        torch.set_num_threads(before)
    return row, pred


def _runtime_row(path, meta, backend, images, y, prep, batch, warmup, iters, threads) -> tuple[Row, Optional[np.ndarray]]:
    precision = meta.precision if isinstance(meta, ModelMeta) else "?"
    row = Row(path.name, precision, backend, size_mb=path.stat().st_size / 1e6)
    if not isinstance(meta, ModelMeta):
        row.status, row.reason = "failed", first_line(meta)
        return row, None
    from tledge_runtime import Classifier

    try:
        with Classifier(path, backend=None if backend == "auto" else backend, threads=threads) as clf:
            row.backend = clf.backend_name
            _check_row(row, clf)
            pred = _predict_all(clf.infer, clf.decide, images, batch)
            row.accuracy = _acc(pred, y)
            _time(row, clf.infer, images, batch, warmup, iters)
        return row, pred
    except TledgeError as e:
        row.status, row.reason = "failed", first_line(e)
        return row, None


def _check_row(row: Row, clf: Any) -> None:
    """Replay the model's own reference set on this row's backend: a row is verified, not assumed."""
    if clf.meta.reference_set is None:
        return
    report = clf.self_check()
    failed = [s.name for s in report.preprocessing if not s.ok] + ["numerics" for b in report.backends if not b.ok]
    row.check = "ok" if report.ok else "differs: " + ", ".join(failed)
    if not report.ok:
        row.status, row.reason = "check failed", "; ".join(report.failures())


def _predict_all(run, decide, images: np.ndarray, batch: int) -> np.ndarray:
    """The decided class of every image (``decide`` turns ``run``'s output into class indices)."""
    return np.concatenate([decide(np.asarray(run(images[i:i + batch]))) for i in range(0, len(images), batch)])


def _time(row: Row, run, images: np.ndarray, batch: int, warmup: int, iters: int) -> None:
    """p50/p99 of single-image calls; throughput of ``batch``-image calls. Same inputs for every row."""
    one = [images[i % len(images)][None] for i in range(warmup + iters)]
    for x in one[:warmup]:
        run(x)
    times = []
    for x in one[warmup:]:
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    row.p50_ms = 1e3 * float(np.percentile(times, 50))
    row.p99_ms = 1e3 * float(np.percentile(times, 99))
    big = np.stack([images[i % len(images)] for i in range(batch)])
    run(big)
    n = max(3, iters // batch)
    t0 = time.perf_counter()
    for _ in range(n):
        run(big)
    row.throughput = n * batch / (time.perf_counter() - t0)


def _compare(rows: list[Row], preds: list[Optional[np.ndarray]], reference: Optional[np.ndarray], y: np.ndarray,
             budgets: dict[str, float]) -> None:
    """Fill in delta (with its paired 95% interval) and agreement against the reference, and mark rows over their
    budget by export's rule: a loss over the budget whose interval lies below zero (never one image)."""
    from tledge_export.verify.gate import paired_interval

    ref_acc = _acc(reference, y) if reference is not None else None
    for row, pred in zip(rows, preds):
        if row.status not in ("ok", "check failed") or row.accuracy is None or ref_acc is None or pred is None:
            continue
        right, ref_right = pred == y, reference == y
        row.agreement = 100.0 * float((pred == reference).mean())
        row.delta_points = 100.0 * (row.accuracy - ref_acc)
        row.interval = paired_interval(int((right & ~ref_right).sum()), int((~right & ref_right).sum()), len(y))
        budget = budgets.get(row.precision)
        if row.status == "ok" and budget is not None and row.delta_points < -budget and row.interval[1] < 0:
            row.status, row.reason = "over budget", (f"accuracy {row.delta_points:+.2f} points [95%: "
                                                     f"{row.interval[0]:+.2f}, {row.interval[1]:+.2f}], budget -{budget:g}")


def _acc(pred: Optional[np.ndarray], y: np.ndarray) -> Optional[float]:
    return None if pred is None else float((pred == y).mean())


def _preprocess_ms(paths: Sequence[Path], prep: Preprocess) -> float:
    from tledge_runtime.image.preprocess import prepare_image

    if not paths:
        return 0.0
    t0 = time.perf_counter()
    for p in paths:
        prepare_image(p, prep)
    return 1e3 * (time.perf_counter() - t0) / len(paths)


