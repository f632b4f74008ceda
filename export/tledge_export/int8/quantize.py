"""int8 QDQ with static calibration on real images (ONNX Runtime's quantization tool).

Two flavours, because the fast int8 kernels of CPUs and of TensorRT want different things:

- ``cpu``: uint8 activations (asymmetric, so ReLU outputs use all 256 levels), int8
  per-channel symmetric weights, int32-quantized biases: ONNX Runtime's recommendation for x86
  and ARM. Weights use 7 bits (``reduce_range``, :data:`~tledge_export.config.WEIGHT_BITS`): x86
  CPUs without VNNI saturate full-range u8 x s8 products, and the file must run right on any CPU.
- ``tensorrt``: int8 activations *and* weights, both symmetric (zero point 0), weights
  per channel, biases left in float (``QuantizeBias=False``). TensorRT's explicit
  quantization accepts only symmetric int8 Q/DQ, and its ONNX parser rejects
  DequantizeLinear of int32 biases (it fuses the float bias into the int8 convolution).

The float model is prepared as ONNX Runtime recommends (``quant_pre_process``: ORT's basic
optimizations and ONNX shape inference), calibrated once, and the calibration (tensor
ranges) cached, so accuracy-aware re-quantization with other nodes kept in float does
not re-run it: the ranges come from the float model and do not change.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from tledge_export.artifact import name_nodes, prune_opsets
from tledge_export.config import METHODS, TARGETS, WEIGHT_BITS
from tledge_export.convert.ood_head import ood_nodes
from tledge_export.errors import ExportError
from tledge_runtime.backends.batching import batches
from tledge_runtime.model.meta import Quantization

log = logging.getLogger(__name__)

CALIB_BATCH = 16  # images per calibration run (min/max calibration)
# ORT's histogram collectors (entropy, percentile) stack each tensor's batches into one array and
# fail when the last batch is smaller; one image per run keeps every batch the same shape.
HISTOGRAM_BATCH = 1


@dataclass(frozen=True)
class Flavour:
    target: str
    activation_type: str  # "uint8" | "int8"
    activation_symmetric: bool
    quantize_bias: bool


FLAVOURS = {
    "cpu": Flavour("cpu", "uint8", activation_symmetric=False, quantize_bias=True),
    "tensorrt": Flavour("tensorrt", "int8", activation_symmetric=True, quantize_bias=False),
}


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over an in-memory NCHW array."""

    def __init__(self, name: str, x: np.ndarray, fixed_batch: Optional[int], chunk: int):
        self._name, self._x, self._fixed, self._chunk = name, x, fixed_batch, chunk
        self._it = None
        self.rewind()

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        batch = next(self._it, None)
        return None if batch is None else {self._name: batch[0]}

    def rewind(self) -> None:
        self._it = iter(batches(self._x, self._fixed, self._chunk))

    def __len__(self) -> int:
        return len(self._x)


class Quantizer:
    """Quantizes one fp32 model, as often as needed, with one calibration pass.

    Use as a context manager: it keeps its work files (pre-processed model, calibration
    cache) in a temporary folder that is removed on exit.
    """

    def __init__(self, model: onnx.ModelProto, calib: np.ndarray, *, target: str = "cpu", method: str = "minmax",
                 fixed_batch: Optional[int] = None):
        if target not in FLAVOURS:
            raise ExportError(f"unknown int8 target {target!r}", hint=f"choose one of {', '.join(TARGETS)}")
        if method not in METHODS:
            raise ExportError(f"unknown calibration method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
        if len(calib) == 0:
            raise ExportError("int8 needs calibration images, none were given",
                              hint="pass --calib DATA or check that the run's training images still exist")
        self.flavour, self.method, self.calib, self.fixed_batch = FLAVOURS[target], method, calib, fixed_batch
        self._tmp = tempfile.TemporaryDirectory(prefix="tledge-int8-")
        work = Path(self._tmp.name)
        self._prepared, self._cache = work / "prepared.onnx", work / "calibration.json"
        self._output = work / "quantized.onnx"
        self.float_model = self._prepare(model)
        self.input_name = self.float_model.graph.input[0].name
        # The out-of-distribution head is never quantized: a few small matrix products whose squared distances
        # int8 would coarsen for no speed (it is float in every format, like the classifier head's output).
        self.ood_nodes = ood_nodes(self.float_model)

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def _prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        # A file, not the proto: given a proto, quant_pre_process hands ORT every initializer as an "external
        # initializer", and ORT's shape inference cannot read a ReduceMean's axes from those (the dynamo exporter's
        # global pooling is a ReduceMean). Symbolic shape inference is for transformer graphs; ONNX's covers CNNs.
        source = self._prepared.with_name("input.onnx")
        onnx.save(model, str(source))
        with _quiet():
            quant_pre_process(str(source), str(self._prepared), skip_symbolic_shape=True)
        prepared = name_nodes(onnx.load(str(self._prepared)))
        onnx.save(prepared, str(self._prepared))
        return prepared

    def quantize(self, float_nodes: Sequence[str] = ()) -> onnx.ModelProto:
        """The QDQ model with the nodes named in ``float_nodes`` left in float."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        f = self.flavour
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        extra = {"ActivationSymmetric": f.activation_symmetric, "WeightSymmetric": True,
                 "QuantizeBias": f.quantize_bias,
                 # The classifier head's logits stay float: 256 levels would coarsen every score the runtime
                 # reports, for no speed (one small matrix product); TensorRT also wants weighted layers'
                 # outputs unquantized.
                 "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]}
        with _quiet():
            # A file path, not the proto: quantize_static rewrites a proto's initializers into
            # external-data references that only live in its own temporary folder.
            chunk = CALIB_BATCH if self.method == "minmax" else HISTOGRAM_BATCH
            quantize_static(str(self._prepared), str(self._output),
                            _Reader(self.input_name, self.calib, self.fixed_batch, chunk),
                            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=WEIGHT_BITS == 7,
                            activation_type=QuantType.QUInt8 if f.activation_type == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=[*float_nodes, *self.ood_nodes],
                            calibrate_method=methods[self.method], extra_options=extra,
                            calibration_cache_path=str(self._cache))
        return prune_opsets(onnx.load(str(self._output)))

    def metadata(self, float_nodes: Sequence[str] = ()) -> Quantization:
        """What the model's metadata records about this quantization."""
        return Quantization(target=self.flavour.target, method=self.method, calibration_images=len(self.calib),
                            activation_type=self.flavour.activation_type, weight_type="int8", per_channel=True,
                            float_nodes=tuple(float_nodes))


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's calibrators print progress on stdout (which carries the CLI's table and --json),
    and its tools log to the root logger: both go to this module's debug log instead."""
    printed = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.setLevel(level)
        if printed.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", printed.getvalue().strip().replace("\n", " | "))
