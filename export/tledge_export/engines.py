"""The ``--engine`` step: a TensorRT engine per TensorRT-bound ONNX, verified on the GPU before it is written.

Sources: the fp16 ONNX and the TensorRT-flavour int8 ONNX, whichever this export made
(the fp32 ONNX when it made neither). Each engine is built (:mod:`.tensorrt`), run on the
held-out images through the runtime's own TensorRT backend, compared with PyTorch under
its source's budget, and written as a tledge engine file (metadata header + plan) only
if it passes. Where TensorRT or a GPU is missing the engine formats are reported
``unavailable`` with what to do, and every other format of the export stands.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import numpy as np
from tledge_runtime.engine_file import write_engine
from tledge_runtime.meta import ModelMeta

from . import artifact
from .errors import EngineError
from .graph_run import batches
from .results import FormatResult
from .tensorrt import TensorRT, build_plan, check_onnx, find_tensorrt, gpu_count
from .verify import Budget, Parity, compare

if TYPE_CHECKING:
    from .pipeline import _Job

log = logging.getLogger(__name__)

TIMING_CACHE = "tensorrt.timing.cache"
_INSTALL_HINT = ("pip install tensorrt cuda-python on a machine with an NVIDIA GPU (TensorRT 10+), use JetPack 6's "
                 "TensorRT on Jetson, or pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings for RTX GPUs; "
                 "then re-run with --engine")
_GPU_HINT = ("run `tledge export --engine` on the machine that will run the engine: an engine is tied to its GPU and "
             "TensorRT version; the ONNX files of this export are what to copy there")


def build_engines(job: _Job) -> list[FormatResult]:
    """One result per engine format this export asked for."""
    cfg = job.cfg
    sources = [fmt for fmt, asked in (("fp16", cfg.fp16), ("int8-trt", cfg.int8)) if asked] or ["fp32"]
    trt = find_tensorrt()
    results = []
    for fmt in sources:
        name = f"{fmt}-engine"
        if fmt not in job.finals:
            results.append(FormatResult(name, "failed", message=f"no {fmt} ONNX to build from (it was not written)",
                                        hint=f"fix the {fmt} export first"))
            continue
        try:
            results.append(_engine(job, fmt, name, trt))
        except EngineError as e:
            log.error("%s: %s", name, e.message)
            results.append(FormatResult(name, "failed", message=e.message, hint=e.hint or ""))
    return results


def _engine(job: _Job, fmt: str, name: str, trt: Optional[TensorRT]) -> FormatResult:
    cfg = job.cfg
    final = job.finals[fmt]
    meta = artifact.read_meta(final)
    spec, p = meta.input, meta.preprocess
    shape = (p.height, p.width, 3) if spec.layout == "NHWC" else (3, p.height, p.width)
    data = final.SerializeToString()
    if trt is None:
        return FormatResult(name, "unavailable", message="TensorRT is not installed here", hint=_INSTALL_HINT)
    if gpu_count() == 0:
        message = "no CUDA GPU here to build and verify a TensorRT engine on"
        details = {}
        if trt.flavour == "tensorrt-rtx":
            # TensorRT for RTX can still parse and build ahead of time: proof the graph is TensorRT-ready.
            check = check_onnx(data, input_name=spec.name, sample_shape=shape, batch=cfg.batch, max_batch=cfg.max_batch)
            message += f"; {check} (a check only: an unverified engine is not written)"
            details["tensorrt_check"] = check
        return FormatResult(name, "unavailable", message=message, hint=_GPU_HINT, details=details)
    log.info("building the %s TensorRT engine with %s", fmt, trt.describe())
    plan = build_plan(data, trt, input_name=spec.name, sample_shape=shape, batch=cfg.batch, max_batch=cfg.max_batch,
                      timing_cache=job.out / TIMING_CACHE, tf32=fmt != "fp32")
    budget = Budget.logits(cfg.fp32_atol, cfg.fp32_rtol) if fmt == "fp32" else Budget(**meta.verification["budget"])
    path = job.out / artifact.engine_name(fmt, trt.flavour)
    parity = _verify(job, plan, meta, path, job.inputs_for(final), budget, trt)
    if not parity.passed:
        artifact.remove_stale(path)
        return FormatResult(name, "over_budget", parity=parity, message="; ".join(parity.failures),
                            hint=f"the {fmt} ONNX passed but its engine did not: report the TensorRT version and GPU")
    verified = meta.with_(verification={**parity.to_dict(), "reference": job.reference_name,
                                        "data": cfg.verification_data, "measured": job.measured})
    write_engine(path, verified, plan)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    job.plans[name] = (plan, verified)
    return FormatResult(name, "ok", path=path, parity=parity, size_bytes=path.stat().st_size,
                        details={"tensorrt": trt.describe()})


def _verify(job: _Job, plan: bytes, meta: ModelMeta, path, x: np.ndarray, budget: Budget, trt: TensorRT) -> Parity:
    """Run the engine with the runtime's TensorRT backend (what a device runs) and compare with PyTorch."""
    from tledge_runtime.trt_backend import TensorRTBackend

    backend = TensorRTBackend(plan, meta, path)
    try:
        chunk = max(1, min(backend.max_batch, 32))
        logits = np.concatenate([backend.run(b)[:n] for b, n in batches(x, job.cfg.batch, chunk)])
    finally:
        backend.close()
    return compare(logits.astype(np.float32), job.reference, job.labels, budget, backend=trt.describe())
