"""``export_checkpoint(checkpoint, config) -> ExportResult``: a tledge checkpoint -> verified ONNX / TensorRT,
the API behind `tledge export`.

This side knows runs and datasets; :mod:`tledge_export` knows graphs. Here:

1. load the checkpoint (one-line :class:`~tledge.errors.CheckpointError` when it is missing,
   corrupt or not tledge's) and rebuild its model;
2. build the model's metadata: labels and preprocessing from the checkpoint, provenance
   (architecture, checkpoint sha256, tledge version, opset, UTC date);
3. decode, at the model's exact input geometry, the verification images (the run's val and
   test splits, held out from training) and the calibration images (a stratified sample of
   the run's training split, or of ``--calib DATA``), each file once, bad files skipped and counted;
4. hand all of it to :func:`tledge_export.export_model` with the :class:`~tledge_export.ExportConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from tledge import __version__
from tledge.data.folders import Sample, Splits, list_images, stratified_sample
from tledge.data.imagecache import decode_images, summarize_skipped
from tledge.errors import CheckpointError, ConfigError, DataError
from tledge.progress import progress
from tledge.train.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint, preprocess_of
from tledge.train.config import CalibrationSource
from tledge_export.config import ExportConfig
from tledge_runtime.errors import MetadataError
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.meta import ModelMeta, Provenance

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint: str | Path, config: ExportConfig = ExportConfig(), *,
                      calibration: CalibrationSource = CalibrationSource(), workers: int = 4):
    """Export ``checkpoint`` (a best.pt/last.pt inside its run folder) as ``config`` asks.

    ``config.out`` defaults to ``<run folder>/export``. Returns :class:`tledge_export.ExportResult`.
    """
    from tledge_export import export_model

    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    labels, prep = list(ckpt["labels"]), preprocess_of(ckpt)
    run = path.parent
    # QAT mirrors training images only if fine-tuning did (--hflip, or what --hflip auto decided for this data)
    mirrored = ckpt.get("hflip", (ckpt.get("config") or {}).get("hflip")) is not False  # older checkpoints: config
    config = replace(config, out=config.out or str(run / "export"), source=str(path),
                     verification_data=f"held-out val+test split of {run.name}", qat_hflip=config.qat_hflip and mirrored)
    config.validate(has_calibration=True)  # option errors before any image is decoded
    splits = _run_splits(run, labels)
    verify = _held_out(splits, prep, run, workers)
    calib = _calibration(config, calibration, splits, prep, workers) if (config.int8 or config.fp16) else None
    net = model_from_checkpoint(ckpt)
    answers, detector = _answers(ckpt, net, config, splits, prep, workers)
    meta = ModelMeta(labels=labels, preprocess=prep, provenance=Provenance(
        architecture=ckpt["arch"], checkpoint_sha256=file_sha256(path), tledge_version=__version__,
        opset=config.opset, created=datetime.now(timezone.utc).replace(microsecond=0).isoformat()),
        answers=answers)
    log.info("exporting %s (%s, %d classes, %dx%d) to %s", path, ckpt["arch"], len(labels), prep.height, prep.width,
             config.out)
    return export_model(_with_score(net, detector), meta, verify_images=verify.images, verify_labels=verify.labels,
                        calib_images=calib, config=config, reference_sources=verify.paths, progress=progress)


def _answers(ckpt: dict[str, Any], net: Any, config: ExportConfig, splits: Splits, prep: Any,
             workers: int) -> tuple[Optional[Answers], Any]:
    """The run's answers and detector as fine-tuning fitted them; fitted now, on the run's own split, for a run
    from before they existed or when --coverage / --ood-keep ask for other ones."""
    from tledge.answers.ood import Detector

    stored = _answers_of(ckpt)
    if stored is not None and config.coverage is None and config.ood_keep is None:
        return stored, Detector.from_checkpoint(ckpt["ood"]) if ckpt.get("ood") else None
    return _fit_now(ckpt, net, config, splits, prep, workers, stored)


def _fit_now(ckpt: dict[str, Any], net: Any, config: ExportConfig, splits: Splits, prep: Any, workers: int,
             stored: Optional[Answers]) -> tuple[Answers, Any]:
    import torch

    from tledge.answers.features import max_ood_bytes, split_outputs
    from tledge.answers.fit import Wanted, fit_answers
    from tledge.train.transforms import Normalize

    point = stored.operating_point.label + ":" + stored.operating_point.target if stored and stored.operating_point \
        else (ckpt.get("config") or {}).get("operating_point")
    wanted = Wanted(point, config.coverage or (stored.conformal.coverage if stored and stored.conformal else 0.95),
                    config.ood_keep or (stored.ood.keep if stored and stored.ood else 0.95),
                    max_ood_bytes=max_ood_bytes(net))
    log.info("fitting calibration, prediction sets and 'unknown' on the run's split (coverage %g, keep %g)",
             wanted.coverage, wanted.ood_keep)
    normalize, device = Normalize(prep), torch.device("cpu")
    outputs = []
    for name, samples in (("train", splits.train), ("val", splits.val)):
        decoded = decode_images(samples, prep, workers=workers, desc=f"decode {name}")
        outputs.append(split_outputs(net, decoded.images, decoded.labels, normalize, batch_size=32, device=device,
                                     desc=f"{name} features") if len(decoded) else None)
    answers, detector, _ = fit_answers(wanted, list(ckpt["labels"]), outputs[0], outputs[1])
    return answers, detector


def _with_score(net: Any, detector: Any) -> Any:
    """The model as export sees it: with the out-of-distribution score as a second output when there is a detector."""
    if detector is None:
        return net
    from torch import nn

    from tledge_export.convert.ood_head import OODHead, WithScore

    head = OODHead(detector.method, detector.arrays, detector.temperature)
    return WithScore(net.backbone, nn.Sequential(net.dropout, net.head), head).eval()


def _answers_of(ckpt: dict[str, Any]) -> Optional[Answers]:
    """What the run fitted for its answers (operating point, calibration); None for runs from before them."""
    stored = ckpt.get("answers")
    if stored is None:
        return None
    try:
        return Answers.from_dict(stored)
    except MetadataError as e:
        raise CheckpointError(f"the checkpoint's answers are invalid: {e.message}", hint="re-run `tledge finetune`") from None


def _held_out(splits: Splits, prep: Any, run: Path, workers: int):
    held_out = splits.val + splits.test
    verify = decode_images(held_out, prep, workers=workers, desc="decode held-out")
    _report_skipped(verify.skipped, len(held_out), "held-out")
    if len(verify) == 0:
        raise DataError(f"none of the {len(held_out)} held-out images of {run} can be read",
                        hint="the run's val/test images moved or were deleted; restore them (see split.json)")
    return verify


def _calibration(config: ExportConfig, source: CalibrationSource, splits: Splits, prep: Any, workers: int):
    """A stratified sample of the calibration pool (never a held-out image), decoded at the model input."""
    pool = _calibration_pool(source, splits)
    held = {s.path.resolve() for s in splits.val + splits.test}
    dropped = [s for s in pool if s.path.resolve() in held]
    if dropped:
        log.warning("calibration: leaving out %d image(s) that are in the held-out split", len(dropped))
        pool = [s for s in pool if s.path.resolve() not in held]
    chosen = stratified_sample(pool, source.size, seed=source.seed, balanced=True)
    if config.int8 and not chosen:
        raise DataError("no calibration images found", hint="pass --calib DATA with image files")
    decoded = decode_images(chosen, prep, workers=workers, desc="decode calibration")
    _report_skipped(decoded.skipped, len(chosen), "calibration")
    return decoded.images if len(decoded) else None


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


def _calibration_pool(source: CalibrationSource, splits: Splits) -> list[Sample]:
    """Calibration candidates: the run's train split, or every image under ``--calib`` grouped by folder."""
    if source.folder is None:
        return list(splits.train)
    root = Path(source.folder)
    if not root.is_dir():
        raise ConfigError(f"--calib {root}: not a folder", hint="pass a folder of images (any layout)")
    files = list_images(root)
    if not files:
        raise DataError(f"--calib {root}: no image files found", hint="pass a folder of .jpg/.png images")
    # Group by parent folder (a class folder in the usual layout) so the sample is stratified;
    # the group index stands in for a label, which calibration never reads.
    groups = {parent: i for i, parent in enumerate(sorted({f.parent for f in files}))}
    return [Sample(f, groups[f.parent]) for f in files]


def _report_skipped(skipped: list[Any], total: int, what: str) -> None:
    if skipped:
        log.warning("%s images: %s", what, summarize_skipped(skipped, total))
