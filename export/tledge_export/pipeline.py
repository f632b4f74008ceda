"""``export_model``: an ``nn.Module`` and its metadata -> verified ONNX (fp32, fp16, int8), TensorRT engines
and a Triton repository. The Python API behind `tledge export`.

The chain, in order, each step public on its own:

1. :func:`tledge_export.verify.run.Reference.from_model`: PyTorch's logits on the held-out images;
2. :func:`tledge_export.steps.export_fp32`, ``export_fp16``, ``export_int8``: build, verify, write
   (:mod:`tledge_export.steps`);
3. :func:`tledge_export.engines.build_engines`: TensorRT engines from the ONNX files just written;
4. :func:`write_triton`: a Triton model repository from the files written.

A format over budget is not written; the others still are. The result says which is which, and
:meth:`ExportResult.raise_for_failures` turns failures into one error with the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tledge_export import artifact
from tledge_export.config import REPORT_NAME, ExportConfig
from tledge_export.errors import ExportError
from tledge_export.int8.step import export_int8
from tledge_export.results import ExportResult, FormatResult
from tledge_export.steps import ExportJob, export_fp16, export_fp32
from tledge_export.verify.references import build_reference_set
from tledge_export.verify.run import Reference
from tledge_runtime.backends.engine_file import read_engine
from tledge_runtime.image.preprocess import Normalizer
from tledge_runtime.model.meta import ModelMeta

log = logging.getLogger(__name__)


def export_model(model: Any, meta: ModelMeta, *, verify_images: np.ndarray, verify_labels: np.ndarray,
                 calib_images: Optional[np.ndarray] = None, config: ExportConfig,
                 reference_sources: Optional[Sequence[Any]] = None,
                 progress: Optional[Callable[..., Any]] = None) -> ExportResult:
    """Export ``model`` (a PyTorch classifier) in every format ``config`` asks for, each verified.

    ``verify_images``: held-out uint8 NHWC images at the model's input size, labelled by
    ``verify_labels``; ``calib_images``: uint8 NHWC images for int8 calibration (and the fp16
    range check); ``reference_sources``: the image files (or bytes) ``verify_images`` were decoded from,
    for the reference set each model carries (without them the decoded arrays are embedded).
    ``progress``: a tqdm-like factory (``tledge.progress.progress``), optional.
    Raises :class:`ExportError` for problems that stop the whole export; over-budget or
    unavailable formats are reported in the result instead (see ``ExportResult.raise_for_failures``).
    """
    has_calib = calib_images is not None and len(calib_images) > 0
    config.validate(has_calibration=has_calib)
    if len(verify_images) == 0:
        raise ExportError("no held-out images to verify the export on", hint="the run's val/test images are missing")
    out = Path(config.out)
    if config.sign_key is not None:  # a key others can read, or no signing library: refused before any work
        from tledge_export.signing import check_signing_key

        check_signing_key(config.sign_key)
    claim_folder(out)
    log.info("PyTorch reference logits on %d held-out images", len(verify_images))
    reference = Reference.from_model(model, verify_images, verify_labels, meta.preprocess, meta.labels,
                                     data=config.verification_data, answers=meta.answers)
    calib_u8 = np.ascontiguousarray(calib_images) if has_calib else None
    references = build_reference_set(model, meta.preprocess, reference, config.reference_images, reference_sources)
    job = ExportJob(model, meta.with_(provenance=replace(meta.provenance, opset=config.opset)), config, reference,
                    Normalizer(meta.preprocess)(calib_u8) if has_calib else None, calib_u8, out,
                    datetime.now(timezone.utc).replace(microsecond=0).isoformat(), references, progress)
    results, triton = _run_steps(job)
    result = ExportResult(out, results, out / REPORT_NAME, _summary(job), triton)
    result.write_report()
    _sign(result, config)
    return result


def _sign(result: ExportResult, config: ExportConfig) -> None:
    """Last step: sign what was written (each Triton version folder, then the whole folder), or remove the
    signatures of an earlier signed export that no longer match."""
    from tledge_export.signing import remove_stale_signatures, sign_export

    if config.sign_key is None:
        remove_stale_signatures(result.out, result.triton)
    else:
        result.signed_by = sign_export(result.out, config.sign_key, result.triton)


EXPORT_MARKER = ".tledge-export"  # written first into every export folder: tledge writes only into folders it owns


def claim_folder(out: Path) -> None:
    """Make ``out`` an export folder, or refuse (untouched) an existing non-empty folder tledge did not make."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: --out exists and is not a folder", hint="choose another --out")
    if out.is_dir() and not (out / EXPORT_MARKER).is_file() and not (out / REPORT_NAME).is_file() \
            and any(out.iterdir()):
        raise ExportError(f"{out}: folder is not empty and is not a tledge export (no {EXPORT_MARKER}); tledge "
                          "writes only into folders it created", hint="choose a new or empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / EXPORT_MARKER).is_file():
        artifact.write_file(out / EXPORT_MARKER, b"tledge export\n")


def _run_steps(job: ExportJob) -> tuple[list[FormatResult], Optional[Path]]:
    cfg = job.config
    total = 1 + cfg.fp16 + cfg.int8 + cfg.engine + cfg.triton
    bar = job.progress(total=total, desc="export", unit="step") if job.progress else None

    def done(step: str) -> None:
        if bar is not None:
            bar.set_postfix(step=step)
            bar.update(1)

    try:
        result, fp32 = export_fp32(job)
        results = [result]
        done("fp32")
        if cfg.fp16:
            results.append(export_fp16(job, fp32))
            done("fp16")
        if cfg.int8:
            results.append(export_int8(job, fp32))
            done("int8")
        if cfg.engine:
            from tledge_export.engines import build_engines

            engines = build_engines([r for r in results if r.ok], job.reference, cfg, job.out)
            for r in engines:  # said once, here, like every other format's decision
                if r.ok:
                    log.info("%s kept: %s", r.format, r.path.name if r.path else "-")
                else:
                    log.warning("%s not written (%s): %s", r.format, r.status, r.message)
            results += engines
            done("engine")
        triton = write_triton(job.out / "triton", results, max_batch=cfg.max_batch) if cfg.triton else None
        if cfg.triton:
            done("triton")
    finally:
        if bar is not None:
            bar.close()
    return results, triton


def write_triton(root: Path, written: Sequence[FormatResult], *, max_batch: int) -> Optional[Path]:
    """A Triton model repository under ``root`` for the models of ``written`` that were written (read back
    from their files: the graph or plan bytes and their metadata); None when there are none."""
    from tledge_export.triton import TritonModel, write_repository
    from tledge_runtime.serve.served_model import default_name

    entries = []
    for r in written:
        if not r.ok or r.path is None:
            continue
        if r.path.suffix == ".onnx":
            meta = artifact.read_meta(r.path)
            entries.append(TritonModel(default_name(meta), r.path.read_bytes(), meta, "onnx"))
        else:
            meta, plan = read_engine(r.path)
            entries.append(TritonModel(default_name(meta, engine=True), plan, meta, "plan"))
    if not entries:
        return None
    write_repository(root, entries, max_batch=max_batch)
    log.info("wrote a Triton model repository with %d model(s): %s", len(entries), root)
    return root


def _summary(job: ExportJob) -> dict[str, Any]:
    cfg, ref = job.config, job.reference
    return {"source": cfg.source, "architecture": job.meta.provenance.architecture, "labels": list(job.meta.labels),
            "checkpoint_sha256": job.meta.provenance.checkpoint_sha256, "created": job.measured,
            "reference": ref.name,
            "images": {"verification": int(len(ref.labels)), "verification_data": cfg.verification_data,
                       "calibration": int(len(job.calib)) if job.calib is not None else 0},
            # the key's path stays out of the report (nothing about a private key goes into an artifact)
            "config": {k: v for k, v in cfg.__dict__.items()
                       if k not in ("out", "verification_data", "source", "sign_key")},
            "signed": cfg.sign_key is not None}
