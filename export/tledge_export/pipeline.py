"""``export_model``: an ``nn.Module`` and its metadata -> verified ONNX (fp32, fp16, int8), TensorRT
engines and a Triton repository. The Python API behind `tledge export`.

Every format goes through the same chain: build the graph, bake preprocessing (if asked),
``onnx.checker``, run it with ONNX Runtime on the held-out images next to PyTorch,
compare against its budget, and only then write it (atomically) with its metadata and
its verification numbers inside. A format over budget is not written (and an older file
of that name is removed); the others still are. The result says which is which, and
:meth:`ExportResult.raise_for_failures` turns failures into one error with the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from tledge_runtime.meta import InputSpec, ModelMeta, OutputSpec, Quantization
from tledge_runtime.preprocess import Normalizer

from . import artifact
from .bake import bake_preprocess
from .engines import build_engines
from .errors import ExportError
from .graph_run import batches, latency_ms, run, session
from .int8 import METHODS, TARGETS
from .onnx_export import EXPORTERS, INPUT_NAME, OUTPUT_NAME, export_onnx
from .results import ExportResult, FormatResult
from .verify import FP32_ATOL, FP32_RTOL, Budget, Parity, compare, torch_logits

log = logging.getLogger(__name__)

FP16_BUDGET = 0.1  # points of accuracy fp16 may lose (the design's budget)
FP16_RANGE_IMAGES = 64  # images the fp16 overflow check runs on


@dataclass(frozen=True)
class ExportConfig:
    """Every knob of an export; the CLI maps its options onto these fields one to one."""

    out: str  # export folder
    fp16: bool = False
    int8: bool = False
    target: str = "cpu"  # int8 flavour: cpu (u8 activations) | tensorrt (symmetric s8)
    calib_method: str = "minmax"  # minmax | entropy | percentile
    batch: Optional[int] = None  # None: dynamic batch axis; N: fixed batch N
    max_batch: int = 32  # largest batch of the TensorRT profile and of Triton's batcher
    opset: int = 18
    exporter: str = "torchscript"  # torchscript | dynamo (see tledge_export.onnx_export)
    bake_preprocess: bool = False  # uint8 NHWC input, normalization inside the graph
    fp16_io: bool = False  # fp16 model with float16 input/output (default: float32 I/O)
    engine: bool = False  # TensorRT engines (fp16 / int8-trt, else fp32)
    triton: bool = False  # Triton model repository in <out>/triton
    budget: float = 1.0  # int8: accuracy drop allowed, points
    min_agreement: float = 99.0  # fp16 and int8: top-1 agreement with PyTorch required, percent
    fp16_budget: float = FP16_BUDGET
    fp32_atol: float = FP32_ATOL
    fp32_rtol: float = FP32_RTOL
    max_float_nodes: Optional[int] = None  # accuracy-aware int8 limit; None: a quarter of the quantized nodes; 0: off
    verification_data: str = "held-out images"  # what the verification images are, recorded in the metadata
    source: str = ""  # what was exported (e.g. the checkpoint path), recorded in report.json

    def validate(self, *, has_calibration: bool) -> None:
        def bad(message: str, hint: str) -> None:
            raise ExportError(message, hint=hint)

        if self.target not in TARGETS:
            bad(f"unknown int8 target {self.target!r}", f"choose one of {', '.join(TARGETS)}")
        if self.calib_method not in METHODS:
            bad(f"unknown calibration method {self.calib_method!r}", f"choose one of {', '.join(METHODS)}")
        if self.exporter not in EXPORTERS:
            bad(f"unknown exporter {self.exporter!r}", f"choose one of {', '.join(EXPORTERS)}")
        if self.batch is not None and self.batch < 1:
            bad(f"batch {self.batch} must be >= 1", "use --batch dynamic or a positive number")
        if self.max_batch < 1 or (self.batch is not None and self.max_batch < self.batch):
            bad(f"max batch {self.max_batch} is below the batch", "raise --max-batch")
        if not 0 <= self.min_agreement <= 100:
            bad(f"minimum agreement {self.min_agreement} is not a percentage", "e.g. --min-agreement 99")
        if self.budget < 0 or self.fp16_budget < 0:
            bad("accuracy budgets are drops in points and cannot be negative", "e.g. --budget 1.0")
        if self.int8 and not has_calibration:
            bad("int8 needs calibration images, none were given", "pass --calib DATA, or keep the run's train split")
        if self.engine and self.int8 and self.target != "tensorrt":
            bad("--engine builds int8 engines from the TensorRT int8 flavour only, this export makes the CPU flavour",
                "add --target tensorrt, or export int8 for the CPU in a separate run without --engine")
        if self.triton and self.batch is not None:
            bad("Triton's dynamic batcher needs a dynamic batch axis", "use --batch dynamic with --triton")


def export_model(model: Any, meta: ModelMeta, *, verify_images: np.ndarray, verify_labels: np.ndarray,
                 calib_images: Optional[np.ndarray] = None, config: ExportConfig,
                 progress: Optional[Callable[..., Any]] = None) -> ExportResult:
    """Export ``model`` (a PyTorch classifier) in every format ``config`` asks for, each verified.

    ``verify_images``: held-out uint8 NHWC images at the model's input size, labelled by
    ``verify_labels``; ``calib_images``: uint8 NHWC images for int8 calibration (and the fp16
    range check). ``progress``: a tqdm-like factory (``tledge.progress.progress``), optional.
    Raises :class:`ExportError` for problems that stop the whole export; over-budget or
    unavailable formats are reported in the result instead (see ``ExportResult.raise_for_failures``).
    """
    config.validate(has_calibration=calib_images is not None and len(calib_images) > 0)
    if len(verify_images) == 0:
        raise ExportError("no held-out images to verify the export on", hint="the run's val/test images are missing")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    job = _Job(model, meta, verify_images, np.asarray(verify_labels), calib_images, config, out, progress)
    return job.run()


class _Job:
    """One export: the shared inputs (reference logits, normalized images) and the per-format steps."""

    def __init__(self, model, meta, verify_images, verify_labels, calib_images, cfg: ExportConfig, out: Path, progress):
        self.model, self.cfg, self.out, self.progress = model, cfg, out, progress
        self.meta = meta.with_(provenance=replace(meta.provenance, opset=cfg.opset))
        normalize = Normalizer(meta.preprocess)
        self.images_u8 = np.ascontiguousarray(verify_images)
        self.x = normalize(self.images_u8)
        self.labels = verify_labels
        has_calib = calib_images is not None and len(calib_images) > 0
        self.x_calib = normalize(np.ascontiguousarray(calib_images)) if has_calib else None
        log.info("PyTorch reference logits on %d held-out images", len(self.x))
        self.reference = torch_logits(model, self.x)
        self.finals: dict[str, onnx.ModelProto] = {}  # format -> the model as written (for engines and Triton)
        self.plans: dict[str, tuple[bytes, ModelMeta]] = {}  # engine format -> (raw plan, its metadata), for Triton
        self.results: list[FormatResult] = []
        self.measured = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        import torch

        self.reference_name = f"PyTorch {torch.__version__.split('+')[0]} fp32 CPU"

    def run(self) -> ExportResult:
        cfg = self.cfg
        steps = ["fp32"] + ["fp16"] * cfg.fp16 + ["int8"] * cfg.int8 + ["engine"] * cfg.engine + ["triton"] * cfg.triton
        bar = self.progress(total=len(steps), desc="export", unit="step") if self.progress else None
        triton = None
        try:
            for step in steps:
                if bar is not None:
                    bar.set_postfix(step=step)
                if step == "fp32":
                    self.fp32 = export_onnx(self.model, self.meta.preprocess, self.meta.num_classes, batch=cfg.batch,
                                            opset=cfg.opset, exporter=cfg.exporter)
                    self.finish("fp32", self.fp32, "fp32", Budget.logits(cfg.fp32_atol, cfg.fp32_rtol))
                elif step == "fp16":
                    self._fp16()
                elif step == "int8":
                    self._int8()
                elif step == "engine":
                    self.results += build_engines(self)
                else:
                    triton = self._triton()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        result = ExportResult(self.out, self.results, self.out / artifact.REPORT_NAME, self._summary(), triton)
        result.write_report()
        return result

    # --- formats ---------------------------------------------------------------------------------

    def _fp16(self) -> None:
        from .fp16 import convert_fp16, fp16_unsafe_nodes, fp32_node_names

        images = self.x_calib if self.x_calib is not None else self.x
        unsafe = fp16_unsafe_nodes(self.fp32, images[:FP16_RANGE_IMAGES], fixed_batch=self.cfg.batch)
        fp16 = convert_fp16(self.fp32, keep_io_types=not self.cfg.fp16_io, fp32_nodes=unsafe)
        self.finish("fp16", fp16, "fp16", Budget.accuracy(self.cfg.fp16_budget, self.cfg.min_agreement),
                    details={"fp32_nodes": fp32_node_names(self.fp32, unsafe), "fp16_io": self.cfg.fp16_io})

    def _int8(self) -> None:
        from .accuracy_aware import search
        from .int8 import Quantizer
        from .sensitivity import rank_nodes

        cfg = self.cfg
        budget = Budget.accuracy(cfg.budget, cfg.min_agreement)
        with Quantizer(self.fp32, self.x_calib, target=cfg.target, method=cfg.calib_method, fixed_batch=cfg.batch) as q:
            def evaluate(model: onnx.ModelProto) -> tuple[Parity, Optional[float]]:
                final = self.bake(model)
                sess = session(final)
                parity = self.parity_of(sess, final, budget)
                sample = next(batches(self.inputs_for(final), cfg.batch, 1))[0]  # batch 1, or the fixed batch
                return parity, latency_ms(sess, sample)

            found = search(q.quantize, evaluate,
                           lambda m: rank_nodes(m, self.x_calib, float_model=q.float_model, fixed_batch=cfg.batch),
                           max_float_nodes=cfg.max_float_nodes, progress=self.progress)
            fmt = "int8" if cfg.target == "cpu" else "int8-trt"
            self.finish(fmt, found.model, "int8", budget, quantization=q.metadata(found.float_nodes),
                        parity=found.parity, details={"quantization": _quant_dict(q.metadata(found.float_nodes)),
                                                      "accuracy_aware": found.to_dict()})

    def _triton(self) -> Optional[Path]:
        from .triton import TritonModel, model_name, write_repository

        arch = self.meta.provenance.architecture or "model"
        entries = []
        for r in self.results:
            if not r.ok or r.path is None:
                continue
            if r.format in self.finals:
                final = self.finals[r.format]
                entries.append(TritonModel(model_name(arch, r.format), final.SerializeToString(),
                                           artifact.read_meta(final), "onnx"))
            elif r.format in self.plans:
                plan, meta = self.plans[r.format]
                entries.append(TritonModel(model_name(arch, r.format), plan, meta, "plan"))
        if not entries:
            return None
        root = write_repository(self.out / "triton", entries, max_batch=self.cfg.max_batch)
        log.info("wrote a Triton model repository with %d model(s): %s", len(entries), root)
        return root

    # --- shared steps ----------------------------------------------------------------------------

    def bake(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return bake_preprocess(model, self.meta.preprocess) if self.cfg.bake_preprocess else model

    def inputs_for(self, model: onnx.ModelProto) -> np.ndarray:
        """The verification images as ``model`` takes them: uint8 NHWC, float16 or float32 NCHW."""
        elem = model.graph.input[0].type.tensor_type.elem_type
        if elem == onnx.TensorProto.UINT8:
            return self.images_u8
        return self.x.astype(np.float16) if elem == onnx.TensorProto.FLOAT16 else self.x

    def parity_of(self, sess: Any, model: onnx.ModelProto, budget: Budget) -> Parity:
        import onnxruntime

        logits = run(sess, self.inputs_for(model), fixed_batch=self.cfg.batch)[0]
        return compare(logits, self.reference, self.labels, budget,
                       backend=f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider")

    def format_meta(self, model: onnx.ModelProto, precision: str, parity: Parity,
                    quantization: Optional[Quantization] = None) -> ModelMeta:
        """The metadata of one written model: its input, precision, quantization and verification."""
        elem = model.graph.input[0].type.tensor_type.elem_type
        dtype = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.FLOAT16: "float16"}.get(elem, "float32")
        baked = self.cfg.bake_preprocess
        return self.meta.with_(
            input=InputSpec(name=INPUT_NAME, layout="NHWC" if baked else "NCHW", dtype=dtype, batch=self.cfg.batch,
                            baked_preprocess=baked),
            output=OutputSpec(name=OUTPUT_NAME, kind="logits"),
            precision=precision, quantization=quantization,
            provenance=replace(self.meta.provenance, opset=artifact.opset_of(model)),
            verification={**parity.to_dict(), "reference": self.reference_name, "data": self.cfg.verification_data,
                          "measured": self.measured})

    def finish(self, fmt: str, core: onnx.ModelProto, precision: str, budget: Budget, *,
               quantization: Optional[Quantization] = None, parity: Optional[Parity] = None,
               details: Optional[dict[str, Any]] = None) -> FormatResult:
        """Bake, check, verify (unless ``parity`` was measured already), then write the model or record why not."""
        final = self.bake(core)
        artifact.check(final, fmt)
        if parity is None:
            parity = self.parity_of(session(final), final, budget)
        path = self.out / artifact.FILE_NAMES[fmt]
        result = FormatResult(fmt, "ok", parity=parity, details=dict(details or {}))
        if parity.passed:
            artifact.embed_meta(final, self.format_meta(final, precision, parity, quantization))
            artifact.save_onnx(final, path)
            result.path, result.size_bytes = path, path.stat().st_size
            self.finals[fmt] = final
        else:
            artifact.remove_stale(path)
            result.status, result.message = "over_budget", "; ".join(parity.failures)
            result.hint = _budget_hint(fmt, parity, result.details)
            log.error("%s over budget, not written: %s", fmt, result.message)
        self.results.append(result)
        return result

    def _summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"source": cfg.source, "architecture": self.meta.provenance.architecture,
                "labels": list(self.meta.labels),
                "checkpoint_sha256": self.meta.provenance.checkpoint_sha256, "created": self.measured,
                "reference": self.reference_name,
                "images": {"verification": int(len(self.x)), "verification_data": cfg.verification_data,
                           "calibration": int(len(self.x_calib)) if self.x_calib is not None else 0},
                "config": {k: v for k, v in cfg.__dict__.items() if k not in ("out", "verification_data", "source")}}


def _budget_hint(fmt: str, parity: Parity, details: dict[str, Any]) -> str:
    few = (f"with {parity.images} held-out images one changed prediction moves accuracy by "
           f"{100 / parity.images:.2g} points")
    if fmt == "fp32":
        return ("the ONNX graph does not compute what the PyTorch model does: try --exporter dynamo or "
                "another --opset, and report the architecture")
    if fmt == "fp16":
        return f"ship the fp32 or int8 model instead, or verify on more held-out images ({few})"
    aware = details.get("accuracy_aware", {})
    limit = aware.get("limit", 0)
    if limit:
        kept = (f"accuracy-aware int8 tried up to {limit} node(s) in float (its limit) without meeting it, "
                f"the closest attempt kept {len(aware.get('float_nodes', []))}; ")
    else:
        kept = "accuracy-aware int8 kept no node in float (--max-float-nodes 0, or no node ranked); "
    used = details.get("quantization", {}).get("method")
    others = " or ".join(m for m in METHODS if m != used)
    return (kept + f"try --calib-method {others}, a larger --calib-size, a larger --max-float-nodes, "
            f"or a looser --budget / --min-agreement; or ship fp16, which keeps accuracy ({few})")


def _quant_dict(q: Quantization) -> dict[str, Any]:
    return {"target": q.target, "method": q.method, "calibration_images": q.calibration_images,
            "activation_type": q.activation_type, "weight_type": q.weight_type, "per_channel": q.per_channel,
            "float_nodes": list(q.float_nodes)}
