"""Running ONNX protos with ONNX Runtime on the CPU (the runtime's own session and batching helpers) and
reading intermediate tensors, for verification, fp16 range checks and int8 sensitivity."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

import numpy as np
import onnx

from tledge_runtime.backends.batching import CHUNK, batches
from tledge_runtime.backends.loader import ort_session


def session(model: onnx.ModelProto, *, threads: Optional[int] = None):
    """An onnxruntime CPU session of ``model`` with full graph optimization (what the runtime uses)."""
    return ort_session(model.SerializeToString(), threads=threads)


def run(sess, x: np.ndarray, *, fixed_batch: Optional[int] = None, outputs: Optional[Sequence[str]] = None,
        chunk: int = CHUNK) -> list[np.ndarray]:
    """Run ``sess`` over all of ``x``; one concatenated array per requested output (default: the first)."""
    name = sess.get_inputs()[0].name
    wanted = list(outputs) if outputs else [sess.get_outputs()[0].name]
    parts: list[list[np.ndarray]] = [[] for _ in wanted]
    for batch, n in batches(x, fixed_batch, chunk):
        for i, value in enumerate(sess.run(wanted, {name: batch})):
            parts[i].append(value[:n])
    return [np.concatenate(p) for p in parts]


def latency_ms(sess, sample: np.ndarray, *, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of one run on ``sample`` (a single batch), in milliseconds."""
    name = sess.get_inputs()[0].name
    out = [sess.get_outputs()[0].name]
    for _ in range(warmup):
        sess.run(out, {name: sample})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(out, {name: sample})
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (typed by shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                              *inferred.graph.output)}
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in present:
            elem = types.get(name, onnx.TensorProto.FLOAT)
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return augmented


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the float tensors that nodes produce (no initializers, no constants)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in (*inferred.graph.value_info, *inferred.graph.output)
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o in floats]


def intermediate_maxima(model: onnx.ModelProto, x: np.ndarray, *, fixed_batch: Optional[int] = None,
                        chunk: int = 8) -> dict[str, float]:
    """Largest magnitude each float tensor of ``model`` reaches on ``x``."""
    names = float_tensors(model)
    sess = session(with_outputs(model, names))
    maxima = dict.fromkeys(names, 0.0)
    input_name = sess.get_inputs()[0].name
    for batch, n in batches(x, fixed_batch, chunk):
        for name, value in zip(names, sess.run(names, {input_name: batch})):
            value = value[:n] if value.ndim and value.shape[0] == len(batch) else value
            maxima[name] = max(maxima[name], float(np.max(np.abs(value))) if value.size else 0.0)
    return maxima
