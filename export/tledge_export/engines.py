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
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from tledge_export import artifact
from tledge_export.config import ExportConfig
from tledge_export.errors import EngineError
from tledge_export.results import FormatResult
from tledge_export.verify.run import Reference
from tledge_runtime.backends.batching import batches
from tledge_runtime.backends.engine_file import write_engine
from tledge_runtime.backends.nvidia import TensorRT, cuda_device_count, find_tensorrt, target_here
from tledge_runtime.backends.trt_build import build_plan, check_onnx
from tledge_runtime.errors import EngineBuildError
from tledge_runtime.model.meta import ModelMeta
from tledge_runtime.model.verification import Budget, Verification

log = logging.getLogger(__name__)

TIMING_CACHE = "tensorrt.timing.cache"
_INSTALL_HINT = ("pip install tensorrt cuda-python on a machine with an NVIDIA GPU (TensorRT 10+), use JetPack 6's "
                 "TensorRT on Jetson, or pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings for RTX GPUs; "
                 "then re-run with --engine")
_GPU_HINT = ("run `tledge export --engine` on the machine that will run the engine: an engine is tied to its GPU and "
             "TensorRT version; the ONNX files of this export are what to copy there")


def build_engines(written: Sequence[FormatResult], reference: Reference, config: ExportConfig,
                  out: Path) -> list[FormatResult]:
    """One result per engine format: an engine from each TensorRT-bound ONNX file in ``written`` (fp16 and
    int8-trt; fp32 when the export made neither), verified on ``reference`` and written to ``out``."""
    files = {r.format: r.path for r in written if r.ok and r.path is not None and r.path.suffix == ".onnx"}
    sources = [fmt for fmt, asked in (("fp16", config.fp16), ("int8-trt", config.int8)) if asked] or ["fp32"]
    trt = find_tensorrt()
    results = []
    for fmt in sources:
        name = f"{fmt}-engine"
        if fmt not in files:
            results.append(FormatResult(name, "failed", message=f"no {fmt} ONNX to build from (it was not written)",
                                        hint=f"fix the {fmt} export first"))
            continue
        try:
            results.append(build_engine(files[fmt], fmt, reference, config, out, trt))
        except (EngineError, EngineBuildError) as e:
            log.error("%s: %s", name, e.message)
            results.append(FormatResult(name, "failed", message=e.message, hint=e.hint or ""))
    return results


def build_engine(onnx_path: Path, fmt: str, reference: Reference, config: ExportConfig, out: Path,
                 trt: Optional[TensorRT]) -> FormatResult:
    """Build, verify and write the engine of one written ONNX file (format ``fmt``), or say why not."""
    name = f"{fmt}-engine"
    meta = artifact.read_meta(onnx_path)
    spec, p = meta.input, meta.preprocess
    shape = (p.height, p.width, 3) if spec.layout == "NHWC" else (3, p.height, p.width)
    data = onnx_path.read_bytes()
    if trt is None:
        return FormatResult(name, "unavailable", message="TensorRT is not installed here", hint=_INSTALL_HINT)
    if gpu_count() == 0:
        message = "no CUDA GPU here to build and verify a TensorRT engine on"
        details = {}
        if trt.flavour == "tensorrt-rtx":
            # TensorRT for RTX can still parse and build ahead of time: proof the graph is TensorRT-ready.
            check = check_onnx(data, input_name=spec.name, sample_shape=shape, batch=config.batch,
                               max_batch=config.max_batch)
            message += f"; {check} (a check only: an unverified engine is not written)"
            details["tensorrt_check"] = check
        return FormatResult(name, "unavailable", message=message, hint=_GPU_HINT, details=details)
    log.info("building the %s TensorRT engine with %s", fmt, trt.describe())
    plan = build_plan(data, trt, input_name=spec.name, sample_shape=shape, batch=config.batch,
                      max_batch=config.max_batch, timing_cache=out / TIMING_CACHE, tf32=fmt != "fp32")
    # The engine is held to its source's budget (an fp32 engine to the logits budget, built without TF32).
    budget = meta.verification.budget if meta.verification is not None else Budget.logits(config.fp32_atol,
                                                                                           config.fp32_rtol)
    path = out / artifact.engine_name(fmt, trt.flavour)
    verification = _verify(plan, meta, path, reference, budget, trt, config.batch)
    if not verification.passed:
        artifact.remove_stale(path)
        return FormatResult(name, "over_budget", parity=verification, message="; ".join(verification.failures),
                            hint=f"the {fmt} ONNX passed but its engine did not: report the TensorRT version and GPU")
    measured = meta.verification.measured if meta.verification is not None else ""
    # The engine records what it was built for; the runtime refuses it elsewhere with both sides named.
    write_engine(path, meta.with_(verification=verification.with_(measured=measured), engine=target_here(trt)),
                 plan)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return FormatResult(name, "ok", path=path, parity=verification, size_bytes=path.stat().st_size,
                        details={"tensorrt": trt.describe()})


def _verify(plan: bytes, meta: ModelMeta, path: Path, reference: Reference, budget: Budget, trt: TensorRT,
            fixed_batch: Optional[int]) -> Verification:
    """Run the engine with the runtime's TensorRT backend (what a device runs) and compare with PyTorch."""
    from tledge_runtime.backends.trt import TensorRTBackend

    backend = TensorRTBackend(plan, meta, path)
    dtype = np.dtype(np.uint8) if meta.input.dtype == "uint8" else np.dtype(np.float32)
    try:
        chunk = max(1, min(backend.max_batch, 32))
        x = reference.inputs_for(dtype)
        logits = np.concatenate([backend.run(b)[:n] for b, n in batches(x, fixed_batch, chunk)])
    finally:
        backend.close()
    return reference.compare(logits.astype(np.float32), budget, backend=trt.describe())


def gpu_count() -> int:
    """CUDA GPUs visible here (cuda-python when installed, else torch)."""
    count = cuda_device_count()
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return int(count)
