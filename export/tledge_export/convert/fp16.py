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


def convert_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True, fp32_nodes: Sequence[str] = (),
                 float_head: str = "") -> onnx.ModelProto:
    """The fp16 version of ``model`` (a new proto); ``fp32_nodes`` and :data:`FP32_OPS` stay float32, and so does
    the head of nodes named ``float_head...`` (the out-of-distribution score) that ends in a graph output."""
    head = [n for n in model.graph.node if float_head and n.name.startswith(float_head)]
    if head:
        return _with_float_head(model, head, lambda body: convert_fp16(body, keep_io_types=keep_io_types,
                                                                       fp32_nodes=fp32_nodes))
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


def _with_float_head(model: onnx.ModelProto, head: list, convert) -> onnx.ModelProto:
    """``convert`` the graph without ``head`` (nodes that end in a graph output), then put ``head`` back in float32.

    onnxconverter-common cannot keep a node that writes a graph output in float32 with ``keep_io_types`` (it
    raises "The downstream node of the second cast node should be graph output"). So the head is taken out, the
    body converted, and the head's nodes and float32 initializers appended again, reading the body's tensors
    through a Cast to float32 where the conversion made them float16.
    """
    names = {n.name for n in head}
    produced = {o for n in head for o in n.output}
    own = {i.name for i in model.graph.initializer}
    body_uses = {i for n in model.graph.node if n.name not in names for i in n.input}
    head_inits = {i for n in head for i in n.input if i in own and i not in body_uses}
    feeds = sorted({i for n in head for i in n.input} - produced - own)
    body = onnx.ModelProto()
    body.CopyFrom(model)
    del body.graph.node[:], body.graph.initializer[:], body.graph.output[:]
    body.graph.node.extend(n for n in model.graph.node if n.name not in names)
    body.graph.initializer.extend(i for i in model.graph.initializer if i.name not in head_inits)
    body.graph.output.extend(o for o in model.graph.output if o.name not in produced)
    converted = convert(body)
    types = _elem_types(converted)
    renamed = {}
    for f in feeds:
        if types.get(f) == onnx.TensorProto.FLOAT16:
            renamed[f] = f"{f}_float32"
            converted.graph.node.append(onnx.helper.make_node("Cast", [f], [renamed[f]], to=onnx.TensorProto.FLOAT,
                                                              name=f"{head[0].name.rsplit('/', 2)[0]}/cast_{len(renamed)}"))
    for node in head:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for k, name in enumerate(copy.input):
            copy.input[k] = renamed.get(name, name)
        converted.graph.node.append(copy)
    converted.graph.initializer.extend(i for i in model.graph.initializer if i.name in head_inits)
    converted.graph.output.extend(o for o in model.graph.output if o.name in produced)
    return converted


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output)}
