"""The per-format export steps: fp32, fp16, int8, each built, verified against PyTorch and written (or not).

Each step takes the :class:`ExportJob` (the model, its base metadata, the config, the held-out
:class:`~tledge_export.verify.run.Reference` and the calibration images) and returns a
:class:`~tledge_export.results.FormatResult`. They all end in :func:`write_verified`: bake the
preprocessing (if asked), ``onnx.checker``, verify with ONNX Runtime against PyTorch, and only then write
the file, atomically, with its metadata and its :class:`~tledge_runtime.model.verification.Verification` inside.
A format over budget is not written (and an older file of that name tledge wrote is removed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from tledge_export import artifact
from tledge_export.config import FILE_NAMES, METHODS, ExportConfig
from tledge_export.convert.bake import bake_preprocess
from tledge_export.convert.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from tledge_export.convert.ood_head import NODE_PREFIX
from tledge_export.results import FormatResult
from tledge_export.verify.references import fit, with_tolerance
from tledge_export.verify.run import Reference, verify_onnx
from tledge_runtime.model.meta import InputSpec, ModelMeta, OutputSpec, Quantization
from tledge_runtime.model.reference_set import ReferenceSet
from tledge_runtime.model.verification import Budget, Verification

log = logging.getLogger(__name__)

FP16_RANGE_IMAGES = 64  # images the fp16 overflow check runs on


@dataclass
class ExportJob:
    """What every step of one export shares."""

    model: Any  # the PyTorch classifier (eval mode, CPU)
    meta: ModelMeta  # labels, preprocessing, provenance: what every written model's metadata starts from
    config: ExportConfig
    reference: Reference  # held-out images and PyTorch's logits on them
    calib: Optional[np.ndarray]  # calibration images, normalized NCHW float32 (int8, fp16 range check)
    calib_images: Optional[np.ndarray]  # the same, uint8 NHWC (quantization-aware training)
    out: Path
    measured: str  # when the export ran (ISO 8601 UTC), recorded in every verification
    references: Optional[ReferenceSet] = None  # embedded in every model, trimmed to each model's size
    progress: Optional[Callable[..., Any]] = None  # tqdm-like factory
    written: list[FormatResult] = field(default_factory=list)  # the formats decided so far, in order

    def bake(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return bake_preprocess(model, self.meta.preprocess) if self.config.bake_preprocess else model


def export_fp32(job: ExportJob) -> tuple[FormatResult, onnx.ModelProto]:
    """The fp32 graph (what fp16 and int8 are made from), and its result; held to the logits budget."""
    cfg = job.config
    fp32 = export_onnx(job.model, job.meta.preprocess, job.meta.num_classes, batch=cfg.batch, opset=cfg.opset,
                       exporter=cfg.exporter)
    return write_verified(job, "fp32", fp32, "fp32", Budget.logits(cfg.fp32_atol, cfg.fp32_rtol)), fp32


def export_fp16(job: ExportJob, fp32: onnx.ModelProto) -> FormatResult:
    """fp16 with onnxconverter-common; nodes whose tensors would overflow fp16 on calibration images stay fp32."""
    from tledge_export.convert.fp16 import convert_fp16, fp16_unsafe_nodes, fp32_node_names

    cfg = job.config
    images = job.calib if job.calib is not None else job.reference.x
    unsafe = fp16_unsafe_nodes(fp32, images[:FP16_RANGE_IMAGES], fixed_batch=cfg.batch)
    # The out-of-distribution head stays float32: squared distances of far-away images overflow fp16.
    fp16 = convert_fp16(fp32, keep_io_types=not cfg.fp16_io, fp32_nodes=unsafe, float_head=NODE_PREFIX)
    return write_verified(job, "fp16", fp16, "fp16", accuracy_budget(cfg, cfg.fp16_budget),
                          details={"fp32_nodes": fp32_node_names(fp32, unsafe), "fp16_io": cfg.fp16_io})


def accuracy_budget(cfg: ExportConfig, max_drop_points: float) -> Budget:
    return Budget.accuracy(max_drop_points, cfg.min_agreement, cfg.max_class_drop)


def write_verified(job: ExportJob, fmt: str, core: onnx.ModelProto, precision: str, budget: Budget, *,
                   quantization: Optional[Quantization] = None, verification: Optional[Verification] = None,
                   details: Optional[dict[str, Any]] = None) -> FormatResult:
    """Bake, check, verify (unless ``verification`` was measured already), then write the model or record why not."""
    final = job.bake(core)
    artifact.check(final, fmt)
    if verification is None:
        verification = verify_onnx(final, job.reference, budget, fixed_batch=job.config.batch)
    verification = verification.with_(measured=job.measured)
    path = job.out / FILE_NAMES[fmt]
    result = FormatResult(fmt, "ok", parity=verification, details=dict(details or {}))
    if verification.passed:
        meta = format_meta(job, final, precision, verification, quantization)
        if job.references is not None:
            refs = with_tolerance(fit(job.references, final.ByteSize()), final, job.meta.preprocess, precision)
            meta = meta.with_(reference_set=refs)
        artifact.embed_meta(final, meta)
        artifact.save_onnx(final, path)
        result.path, result.size_bytes = path, path.stat().st_size
        numbers = verification.summary() if budget.kind == "accuracy" else f"max |Δlogit| {verification.max_abs_diff:.2g}"
        log.info("%s kept: %s, %.1f MB (%s)", fmt, path.name, result.size_bytes / 1e6, numbers)
    else:
        artifact.remove_stale(path)
        result.status, result.message = "over_budget", "; ".join(verification.failures)
        result.hint = budget_hint(fmt, verification, result.details, job.written)
        log.warning("%s refused, not written: %s", fmt, result.message)
    job.written.append(result)
    return result


def format_meta(job: ExportJob, model: onnx.ModelProto, precision: str, verification: Verification,
                quantization: Optional[Quantization] = None) -> ModelMeta:
    """The metadata of one written model: its input, precision, quantization and verification."""
    elem = model.graph.input[0].type.tensor_type.elem_type
    dtype = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT16: "float16"}.get(elem, "float32")
    baked = job.config.bake_preprocess
    return job.meta.with_(
        input=InputSpec(name=INPUT_NAME, layout="NHWC" if baked else "NCHW", dtype=dtype, batch=job.config.batch,
                        baked_preprocess=baked),
        output=OutputSpec(name=OUTPUT_NAME, kind="logits"),
        precision=precision, quantization=quantization,
        provenance=replace(job.meta.provenance, opset=artifact.opset_of(model)),
        verification=verification)


def budget_hint(fmt: str, v: Verification, details: dict[str, Any], decided: Sequence[FormatResult] = ()) -> str:
    """What to try when ``fmt`` missed its budget, from what was tried already (``decided``: the formats this
    export has decided before it; a format it refused is never suggested)."""
    few = (f"with {v.images} held-out images one changed prediction moves accuracy by "
           f"{100 / max(v.images, 1):.2g} points")
    refused = {r.format for r in decided if not r.ok}
    ship = "ship fp16, which keeps accuracy" if "fp16" not in refused else "ship the fp32 model"
    if fmt == "fp32":
        return ("the ONNX graph does not compute what the PyTorch model does: try --exporter dynamo or "
                "another --opset, and report the architecture")
    if fmt == "fp16":
        return f"ship the fp32 model instead, or verify on more held-out images ({few})"
    aware = details.get("accuracy_aware") or details.get("post_training", {})
    used = details.get("quantization", {}).get("method")
    others = " or ".join(m for m in METHODS if m != used)
    if "qat" in details:  # accuracy_aware is then the search on the QAT weights; post_training what came before
        post, search = details.get("post_training"), details.get("accuracy_aware") or {}
        qat = (f"quantization-aware training ({details['qat'].get('steps')} steps"
               + (f", then up to {search['limit']} node(s) kept in float)" if search.get("limit") else ")"))
        what = (f"post-training int8 (up to {post.get('limit', 0)} node(s) kept in float) and {qat} both missed it"
                if post else f"{qat} missed it")
        return (f"{what}: try a longer QAT (a larger --qat-epochs), a larger --calib-size, --calib-method {others}, "
                f"a looser --budget / --min-agreement, or {ship} ({few})")
    limit = aware.get("limit", 0)
    if limit:
        kept = (f"accuracy-aware int8 tried up to {limit} node(s) in float (its limit) without meeting it, "
                f"the closest attempt kept {len(aware.get('float_nodes', []))}; ")
    else:
        kept = "accuracy-aware int8 kept no node in float (--max-float-nodes 0, or no node ranked); "
    return (kept + f"try --qat on, --calib-method {others}, a larger --calib-size, a larger --max-float-nodes, "
            f"or a looser --budget / --min-agreement; or {ship} ({few})")


def quant_dict(q: Quantization) -> dict[str, Any]:
    return {"target": q.target, "method": q.method, "calibration_images": q.calibration_images,
            "activation_type": q.activation_type, "weight_type": q.weight_type, "per_channel": q.per_channel,
            "float_nodes": list(q.float_nodes)}
