"""``export_checkpoint(opts) -> ExportResult``: a tledge checkpoint -> verified ONNX / TensorRT, the API
behind `tledge export`.

This side knows runs and datasets; :mod:`tledge_export` knows graphs. Here:

1. load the checkpoint (one-line :class:`~tledge.errors.CheckpointError` when it is missing,
   corrupt or not tledge's) and rebuild its model;
2. build the model's metadata: labels and preprocessing from the checkpoint, provenance
   (architecture, checkpoint sha256, tledge version, opset, UTC date);
3. decode, at the model's exact input geometry, the verification images (the run's val and
   test splits, held out from training) and the calibration images (a stratified sample of
   the run's training split, or of ``--calib DATA``), each file once, bad files skipped and counted;
4. hand all of it to :func:`tledge_export.export_model`.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tledge_runtime.meta import ModelMeta, Provenance

from . import __version__
from .checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, preprocess_of
from .data import Sample, Splits, list_images
from .errors import ConfigError, DataError
from .imagecache import decode_images, summarize_skipped
from .progress import progress

log = logging.getLogger(__name__)

DEFAULT_CALIB_SIZE = 300  # ORT's and TensorRT's guidance: a few hundred representative images


@dataclass(frozen=True)
class ExportOptions:
    """`tledge export`'s options. Fields after ``calib_size`` map onto :class:`tledge_export.ExportConfig`."""

    checkpoint: str
    out: Optional[str] = None  # default: <run folder>/export
    calib: Optional[str] = None  # calibration image folder; default: the run's train split
    calib_size: int = DEFAULT_CALIB_SIZE
    fp16: bool = False
    int8: bool = False
    target: str = "cpu"
    calib_method: str = "minmax"
    batch: Optional[int] = None
    max_batch: int = 32
    opset: int = 18
    exporter: str = "torchscript"
    bake_preprocess: bool = False
    fp16_io: bool = False
    engine: bool = False
    triton: bool = False
    budget: float = 1.0
    min_agreement: float = 99.0
    max_float_nodes: Optional[int] = None
    workers: int = 4  # image decoding threads
    seed: int = 0  # calibration sampling


def export_checkpoint(opts: ExportOptions):
    """Export the checkpoint ``opts.checkpoint`` as ``opts`` asks; returns :class:`tledge_export.ExportResult`."""
    from tledge_export import ExportConfig, export_model

    path = Path(opts.checkpoint)
    ckpt = load_checkpoint(path)
    labels, prep = list(ckpt["labels"]), preprocess_of(ckpt)
    run = path.parent
    out = Path(opts.out) if opts.out else run / "export"
    config = ExportConfig(out=str(out), **{k: getattr(opts, k) for k in (
        "fp16", "int8", "target", "calib_method", "batch", "max_batch", "opset", "exporter", "bake_preprocess",
        "fp16_io", "engine", "triton", "budget", "min_agreement", "max_float_nodes")},
        verification_data=f"held-out val+test split of {run.name}", source=str(path))
    needs_calibration = opts.int8 or opts.fp16
    config.validate(has_calibration=True)  # option errors before any image is decoded

    splits = _run_splits(run, labels)
    held_out = splits.val + splits.test
    verify = decode_images(held_out, prep, workers=opts.workers, desc="decode held-out")
    _report_skipped(verify.skipped, len(held_out), "held-out")
    if len(verify) == 0:
        raise DataError(f"none of the {len(held_out)} held-out images of {run} can be read",
                        hint="the run's val/test images moved or were deleted; restore them (see split.json)")
    calib = None
    if needs_calibration:
        pool = _calibration_pool(opts, splits, labels)
        held = {s.path.resolve() for s in held_out}
        dropped = [s for s in pool if s.path.resolve() in held]
        if dropped:
            log.warning("calibration: leaving out %d image(s) that are in the held-out split", len(dropped))
            pool = [s for s in pool if s.path.resolve() not in held]
        chosen = stratified_sample(pool, opts.calib_size, seed=opts.seed)
        if opts.int8 and not chosen:
            raise DataError("no calibration images found", hint="pass --calib DATA with image files")
        decoded = decode_images(chosen, prep, workers=opts.workers, desc="decode calibration")
        _report_skipped(decoded.skipped, len(chosen), "calibration")
        calib = decoded.images if len(decoded) else None

    meta = ModelMeta(labels=labels, preprocess=prep, provenance=Provenance(
        architecture=ckpt["arch"], checkpoint_sha256=file_sha256(path), tledge_version=__version__, opset=opts.opset,
        created=datetime.now(timezone.utc).replace(microsecond=0).isoformat()))
    model = model_from_checkpoint(ckpt)
    log.info("exporting %s (%s, %d classes, %dx%d) to %s", path, ckpt["arch"], len(labels), prep.height, prep.width,
             out)
    result = export_model(model, meta, verify_images=verify.images, verify_labels=verify.labels, calib_images=calib,
                          config=config, progress=progress)
    return result


def _run_splits(run: Path, labels: Sequence[str]) -> Splits:
    """The run's saved split (split.json next to the checkpoint), checked against the checkpoint's labels."""
    saved = run / "split.json"
    if not saved.is_file():
        raise DataError(f"{saved}: not found; verification needs the run's held-out images",
                        hint="export the best.pt inside its run folder (runs/<name>/best.pt), next to split.json")
    try:
        splits = Splits.from_json(saved.read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{saved}: unreadable ({type(e).__name__})",
                        hint="restore the run folder's split.json") from None
    if list(splits.classes) != list(labels):
        raise DataError(f"{saved}: classes {splits.classes} differ from the checkpoint's {list(labels)}",
                        hint="the checkpoint was moved into another run's folder; export it from its own run")
    return splits


def _calibration_pool(opts: ExportOptions, splits: Splits, labels: Sequence[str]) -> list[Sample]:
    """Calibration candidates: the run's train split, or every image under ``--calib`` grouped by folder."""
    if opts.calib is None:
        return list(splits.train)
    root = Path(opts.calib)
    if not root.is_dir():
        raise ConfigError(f"--calib {root}: not a folder", hint="pass a folder of images (any layout)")
    files = list_images(root)
    if not files:
        raise DataError(f"--calib {root}: no image files found", hint="pass a folder of .jpg/.png images")
    # Group by parent folder (a class folder in the usual layout) so the sample is stratified;
    # the group index stands in for a label, which calibration never reads.
    groups = {parent: i for i, parent in enumerate(sorted({f.parent for f in files}))}
    return [Sample(f, groups[f.parent]) for f in files]


def stratified_sample(samples: Sequence[Sample], n: int, *, seed: int = 0) -> list[Sample]:
    """Up to ``n`` samples, as evenly spread over the labels as their counts allow, seeded."""
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: str(s.path)):
        by_label[s.label].append(s)
    rng = random.Random(seed)
    for items in by_label.values():
        rng.shuffle(items)
    chosen: list[Sample] = []
    queues = [by_label[k] for k in sorted(by_label)]
    while len(chosen) < n and any(queues):  # round robin: one per label per pass
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop())
    return chosen


def _report_skipped(skipped: list[Any], total: int, what: str) -> None:
    if skipped:
        log.warning("%s images: %s", what, summarize_skipped(skipped, total))
