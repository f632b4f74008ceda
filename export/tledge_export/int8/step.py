"""The int8 step: post-training QDQ calibration, accuracy-aware (the most sensitive nodes kept in float until the
budget holds), then quantization-aware training (:mod:`tledge_export.int8.qat`) when that is not enough (``--qat auto``,
the default) or when asked (``--qat on``).

The QAT model is fine-tuned on the export's calibration images (a stratified sample of the run's training split,
never a held-out image), with the fp32 model as teacher, and written by the same ONNX Runtime QDQ quantizer and
the same verification as every other format: same file, same flavour, same budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Optional

import numpy as np
import onnx

from tledge_export.errors import ExportError
from tledge_export.graph_run import latency_ms, session
from tledge_export.int8.quantize import Quantizer
from tledge_export.results import FormatResult
from tledge_export.steps import ExportJob, accuracy_budget, quant_dict, write_verified
from tledge_export.verify.run import verify_session
from tledge_runtime.backends.batching import pad_to
from tledge_runtime.model.verification import Budget, Verification

log = logging.getLogger(__name__)


def export_int8(job: ExportJob, fp32: onnx.ModelProto) -> FormatResult:
    """int8 QDQ: post-training calibration, accuracy-aware (sensitive nodes kept in float until the budget
    holds), then quantization-aware training when that is not enough (``--qat auto``) or asked (``--qat on``)."""
    cfg = job.config
    budget = accuracy_budget(cfg, cfg.budget)
    fmt = "int8" if cfg.target == "cpu" else "int8-trt"
    if cfg.qat == "on":
        return export_qat(job, None, budget, fmt)
    with Quantizer(fp32, job.calib, target=cfg.target, method=cfg.calib_method, fixed_batch=cfg.batch) as q:
        found = _search(job, q, budget)
        quant = q.metadata(found.float_nodes)
        details = {"quantization": quant_dict(quant), "accuracy_aware": found.to_dict()}
        if found.parity.passed or cfg.qat == "off":
            return write_verified(job, fmt, found.model, "int8", budget, quantization=quant,
                                  verification=found.parity, details=details)
        return export_qat(job, q, budget, fmt, previous=found)


def _search(job: ExportJob, q: Any, budget: Budget, stage: str = "post-training int8") -> Any:
    """Accuracy-aware int8 over the quantizer ``q``: all-int8, then sensitive nodes in float until the budget holds."""
    from tledge_export.int8.accuracy_aware import search
    from tledge_export.int8.sensitivity import rank_nodes

    return search(q.quantize, lambda m: evaluate_int8(job, m, budget),
                  lambda m: rank_nodes(m, job.calib, float_model=q.float_model, fixed_batch=job.config.batch),
                  max_float_nodes=job.config.max_float_nodes, progress=job.progress, stage=stage)


def evaluate_int8(job: ExportJob, model: onnx.ModelProto, budget: Budget) -> tuple[Verification, float]:
    """Verification and batch-1 CPU latency (ms) of one int8 candidate."""
    final = job.bake(model)
    sess = session(final)
    verification = verify_session(sess, job.reference, budget, fixed_batch=job.config.batch)
    elem = final.graph.input[0].type.tensor_type.elem_type
    sample = job.reference.inputs_for(np.dtype(np.uint8) if elem == onnx.TensorProto.UINT8 else np.dtype(np.float32))
    return verification, latency_ms(sess, pad_to(sample[:1], job.config.batch))


def export_qat(job: ExportJob, quantizer: Any, budget: Budget, fmt: str, previous: Optional[Any] = None) -> FormatResult:
    """QAT int8 of ``job.model``, verified and written like post-training int8. ``previous``: the post-training
    search (:class:`tledge_export.int8.accuracy_aware.Search`) that missed the budget, reported beside it."""
    from tledge_export.int8.qat import QATConfig, qat_int8

    cfg = job.config
    images = job.calib_images
    before = {"post_training": previous.to_dict()} if previous is not None else {}
    steps = max(1, math.ceil(cfg.qat_epochs * len(images) / QATConfig.batch_size))
    why = ("because post-training int8 missed its budget, best " + previous.parity.summary()
           if previous is not None else "as asked (--qat on)")
    log.info("quantization-aware training next, %s: %d steps over %d calibration images, the fp32 model as "
             "teacher", why, steps, len(images))
    try:
        result = qat_int8(job.model, images, job.meta.preprocess, calib_images=images,
                          config=QATConfig(target=cfg.target, steps=steps, hflip=cfg.qat_hflip), batch=cfg.batch, opset=cfg.opset,
                          progress=job.progress, quantize=False)  # quantized below, by the accuracy-aware search
    except ExportError as e:
        if previous is None:
            raise
        # QAT unavailable here: the post-training result stands, over its budget, and says how to get QAT.
        log.warning("quantization-aware training unavailable: %s", e.message)
        quant = quantizer.metadata(previous.float_nodes)
        missed = write_verified(job, fmt, previous.model, "int8", budget, quantization=quant,
                                verification=previous.parity, details={"quantization": quant_dict(quant), **before})
        missed.hint = f"{e.message} ({e.hint}); " + missed.hint
        return missed
    # The QAT weights go through the same accuracy-aware search as post-training int8: all-int8 first, then the
    # most sensitive nodes in float until the budget holds.
    with Quantizer(result.float_model, job.calib, target=cfg.target, method=cfg.calib_method,
                   fixed_batch=cfg.batch) as q:
        found = _search(job, q, budget, stage="QAT int8")
        quant = replace(q.metadata(found.float_nodes), method="qat")
        return write_verified(job, fmt, found.model, "int8", budget, quantization=quant, verification=found.parity,
                              details={"quantization": quant_dict(quant), "qat": result.details,
                                       "accuracy_aware": found.to_dict(), **before})
