"""Every knob of an export, its default and its budget: the one source the CLI, the Python API and
`tledge benchmark` read. Light on purpose (no torch, no onnx), so `tledge --help` stays fast."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Optional

from tledge_export.errors import ExportError
from tledge_runtime.model.export_report import REPORT_NAME  # noqa: F401 - the runtime reads it too

# File name of each format inside the export folder (`tledge benchmark` looks for the first three).
FILE_NAMES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",  # CPU flavour: u8 activations, s8 per-channel weights
    "int8-trt": "model.int8-trt.onnx",  # TensorRT flavour: symmetric s8
}

# Budgets against PyTorch on the held-out images (see tledge_export.verify.compare for why these values).
FP32_ATOL = 1e-4  # logits: |Δ| <= atol + rtol * |logit|
FP32_RTOL = 1e-4
FP16_BUDGET = 0.1  # points of accuracy fp16 may lose
INT8_BUDGET = 1.0  # points of accuracy int8 may lose
MIN_AGREEMENT = 99.0  # percent of images on which fp16 and int8 must pick PyTorch's class

TARGETS = ("cpu", "tensorrt")  # int8 flavours, see tledge_export.int8.quantize
METHODS = ("minmax", "entropy", "percentile")  # calibration methods
EXPORTERS = ("torchscript", "dynamo")
QAT_MODES = ("off", "auto", "on")  # quantization-aware training: never, when PTQ misses the budget, always
# int8 weights use 7 of their 8 bits (ONNX Runtime's ``reduce_range``), in both flavours. On x86 CPUs without
# VNNI (AVX2 only: AMD Zen 1-3, Intel before Ice Lake / Cascade Lake) ONNX Runtime multiplies u8 activations by
# s8 weights with VPMADDUBSW, which saturates the int16 sum of two products; with full-range weights a tiny
# EfficientNet-Lite0 lost 20 points of accuracy on an AMD EPYC (Zen 3), 0 with 7-bit weights. A model must give
# the same answers on every CPU it may be copied to, so the artifact is quantized the way every CPU runs correctly.
WEIGHT_BITS = 7


@dataclass(frozen=True)
class ExportConfig:
    """Every knob of an export; the CLI maps its options onto these fields one to one."""

    out: Optional[str] = None  # export folder (tledge export: <run folder>/export)
    fp16: bool = False
    int8: bool = False
    target: str = "cpu"  # int8 flavour: cpu (u8 activations) | tensorrt (symmetric s8)
    calib_method: str = "minmax"  # minmax | entropy | percentile
    batch: Optional[int] = None  # None: dynamic batch axis; N: fixed batch N
    max_batch: int = 32  # largest batch of the TensorRT profile and of Triton's batcher
    opset: int = 18
    exporter: str = "torchscript"  # torchscript | dynamo (see tledge_export.convert.onnx_export)
    bake_preprocess: bool = False  # uint8 NHWC input, normalization inside the graph
    fp16_io: bool = False  # fp16 model with float16 input/output (default: float32 I/O)
    engine: bool = False  # TensorRT engines (fp16 / int8-trt, else fp32)
    triton: bool = False  # Triton model repository in <out>/triton
    sign_key: Optional[str] = None  # EC private key (PEM, mode 0600): OpenSSF model-signing signatures (model.sig)
    budget: float = INT8_BUDGET  # int8: accuracy drop allowed, points
    min_agreement: float = MIN_AGREEMENT  # fp16 and int8: top-1 agreement with PyTorch required, percent
    max_class_drop: Optional[float] = None  # fp16 and int8: accuracy drop allowed in any one class, points
    fp16_budget: float = FP16_BUDGET
    fp32_atol: float = FP32_ATOL
    fp32_rtol: float = FP32_RTOL
    max_float_nodes: Optional[int] = None  # accuracy-aware int8 limit; None: a quarter of the quantized nodes; 0: off
    qat: str = "auto"  # off | auto (when post-training int8 misses its budget) | on
    qat_epochs: float = 2.0  # passes over the calibration images during quantization-aware training
    qat_hflip: bool = True  # QAT also trains on mirrored images (tledge passes the fine-tuning run's own choice)
    reference_images: int = 8  # held-out images embedded in each model for `tledge-runtime check`; 0: synthetic
    # Prediction sets' coverage and the "unknown" threshold's keep rate, refitted on the run's split at export;
    # None: the ones fine-tuning fitted (a run from before them gets 0.95 and 0.95).
    coverage: Optional[float] = None
    ood_keep: Optional[float] = None
    verification_data: str = "held-out images"  # what the verification images are, recorded in the metadata
    source: str = ""  # what was exported (e.g. the checkpoint path), recorded in report.json

    def validate(self, *, has_calibration: bool) -> None:
        for ok, message, hint in self._checks(has_calibration):
            if not ok:
                raise ExportError(message, hint=hint)

    def _checks(self, has_calibration: bool) -> list[tuple[bool, str, str]]:
        return [
            (self.out is not None, "no export folder given", "set ExportConfig.out"),
            (self.target in TARGETS, f"unknown int8 target {self.target!r}", f"choose one of {', '.join(TARGETS)}"),
            (self.calib_method in METHODS, f"unknown calibration method {self.calib_method!r}",
             f"choose one of {', '.join(METHODS)}"),
            (self.exporter in EXPORTERS, f"unknown exporter {self.exporter!r}", f"choose one of {', '.join(EXPORTERS)}"),
            (self.qat in QAT_MODES, f"unknown --qat mode {self.qat!r}", f"choose one of {', '.join(QAT_MODES)}"),
            (self.batch is None or self.batch >= 1, f"batch {self.batch} must be >= 1",
             "use --batch dynamic or a positive number"),
            (self.max_batch >= 1 and (self.batch is None or self.max_batch >= self.batch),
             f"max batch {self.max_batch} is below the batch", "raise --max-batch"),
            (0 <= self.min_agreement <= 100, f"minimum agreement {self.min_agreement} is not a percentage",
             "e.g. --min-agreement 99"),
            (self.budget >= 0 and self.fp16_budget >= 0 and (self.max_class_drop or 0) >= 0,
             "accuracy budgets are drops in points and cannot be negative", "e.g. --budget 1.0"),
            (0 <= self.reference_images <= 64, f"--reference-images {self.reference_images} is not in 0..64",
             "a few images are enough: 8 by default"),
            (self.coverage is None or 0 < self.coverage < 1, f"--coverage {self.coverage} is not in (0, 1)",
             "e.g. --coverage 0.95"),
            (self.ood_keep is None or 0 < self.ood_keep < 1, f"--ood-keep {self.ood_keep} is not in (0, 1)",
             "e.g. --ood-keep 0.95"),
            (not self.int8 or has_calibration, "int8 needs calibration images, none were given",
             "pass --calib DATA, or keep the run's train split"),
            (not (self.engine and self.int8 and self.target != "tensorrt"),
             "--engine builds int8 engines from the TensorRT int8 flavour only, this export makes the CPU flavour",
             "add --target tensorrt, or export int8 for the CPU in a separate run without --engine"),
            (not (self.triton and self.batch is not None), "Triton's dynamic batcher needs a dynamic batch axis",
             "use --batch dynamic with --triton"),
        ]


def default(name: str) -> Any:
    """The default of one :class:`ExportConfig` field: what a CLI option shows and uses."""
    field = next(f for f in fields(ExportConfig) if f.name == name)
    if field.default is MISSING:
        raise KeyError(f"{name} has no default")
    return field.default
