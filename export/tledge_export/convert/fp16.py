"""fp32 ONNX -> fp16 ONNX with onnxconverter-common, keeping float32 where fp16 would break.

Two things stay in float32:

- Ops whose fp16 result is known to be fragile (:data:`FP32_OPS`): onnxconverter-common's
  default block list, plus reductions over whole feature maps and exponentials (a mean of
  thousands of fp16 values loses digits; ``Exp``/``Softmax`` overflow at 11.1). In a CNN
  classifier these run once, at the head, so keeping them in float32 costs nothing measurable.
- Nodes that the *data* says would overflow: the float model is run on calibration images
  and every node that produces, or consumes, a tensor larger than :data:`FP16_SAFE_MAX` in
  magnitude is kept in float32 (fp16's largest finite value is 65504; the margin leaves
  room for images brighter than the calibration set).

Inputs and outputs stay float32 (``keep_io_types``) unless fp16 I/O is asked for, so the
runtime feeds the same normalized tensor to every precision.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import onnx

from tledge_export.graph_run import intermediate_maxima

log = logging.getLogger(__name__)

FP16_SAFE_MAX = 16384.0  # a quarter of fp16's largest finite value (65504)
FP32_OPS = ("GlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
            "Softmax", "LogSoftmax", "Exp", "Log", "Pow")


def fp16_unsafe_nodes(model: onnx.ModelProto, images: np.ndarray, *, fixed_batch: int | None = None) -> list[str]:
    """Names of the nodes that produce or consume a tensor whose magnitude exceeds :data:`FP16_SAFE_MAX`
    on ``images`` (normalized NCHW float32)."""
    maxima = intermediate_maxima(model, images, fixed_batch=fixed_batch)
    large = {name for name, value in maxima.items() if value > FP16_SAFE_MAX}
    unsafe = [n.name for n in model.graph.node if large & (set(n.input) | set(n.output))]
    if unsafe:
        log.info("fp16: keeping %d node(s) in float32, their tensors exceed %.0f: %s", len(unsafe), FP16_SAFE_MAX,
                 ", ".join(unsafe[:8]) + (" ..." if len(unsafe) > 8 else ""))
    return unsafe


def convert_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True,
                 fp32_nodes: Sequence[str] = ()) -> onnx.ModelProto:
    """The fp16 version of ``model`` (a new proto); ``fp32_nodes`` and :data:`FP32_OPS` stay float32."""
    from onnxconverter_common import float16

    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    with warnings.catch_warnings(record=True) as caught:
        # One warning per weight smaller than fp16 can hold (set to +-1e-7): a count is enough.
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=block,
                                                     node_block_list=list(fp32_nodes))
    if caught:
        log.debug("fp16: onnxconverter-common clamped %d tiny or huge weight values to fp16's range", len(caught))
    # The converter leaves stale value_info types around the float32 islands it creates (a Cast whose
    # output is still typed float32); shape inference re-derives them all from the nodes.
    del converted.graph.value_info[:]
    return converted


def fp32_node_names(model: onnx.ModelProto, fp32_nodes: Sequence[str]) -> list[str]:
    """The nodes of the fp32 ``model`` that the conversion keeps in float32 (by op type or by data)."""
    return [n.name for n in model.graph.node if n.op_type in FP32_OPS or n.name in set(fp32_nodes)]
