"""Which nodes of an int8 QDQ model lose the most to quantization: the ranking accuracy-aware int8 uses.

A node's sensitivity is the quantization noise on what it reads. For each of its quantized
inputs (activations and weights) the noise-to-signal ratio ``||x - QDQ(x)||^2 / ||x||^2`` is
measured *per channel* and averaged over the channels, each capped at 1 (a channel wiped
out entirely); a node's score is the sum over its inputs. Per channel, because the usual
way int8 breaks a CNN is one wide-range channel setting a per-tensor activation scale that
rounds every narrow channel to a few levels (depthwise convolutions, outlier features): a
whole-tensor ratio is dominated by the wide channel and misses exactly that. Channels that
are essentially always zero (dead ReLUs) are left out of the average.

Activations are measured on calibration images by running the QDQ model with each
quantized tensor and its dequantized copy exposed as outputs; weights are compared with the
float weights they replaced. Keeping a node in float removes its terms (its weights stay
float, its inputs are no longer quantized for it). One inference pass over a few images
ranks every node, where a leave-one-out search would quantize and verify once per node.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from tledge_export.graph_run import session, with_outputs
from tledge_runtime.backends.batching import batches

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SENSITIVITY_IMAGES = 32  # calibration images used to measure activation noise
DEAD_CHANNEL = 1e-6  # channels with less energy than this times the median channel's are ignored
_CHUNK = 8


def rank_nodes(qdq: onnx.ModelProto, images: np.ndarray, *, float_model: Optional[onnx.ModelProto] = None,
               fixed_batch: Optional[int] = None) -> list[tuple[str, float]]:
    """``(node name, score)`` for every quantized node of ``qdq``, most sensitive first.

    ``images``: normalized NCHW calibration images; ``float_model``: the model ``qdq`` was
    quantized from, whose float weights give the exact weight error.
    """
    g = qdq.graph
    floats = {t.name: t for t in float_model.graph.initializer} if float_model is not None else {}
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    activation_pairs: dict[str, tuple[str, str]] = {}  # dequantized tensor -> (float tensor, dequantized tensor)
    weight_score: dict[str, float] = {}
    reads: dict[str, list[str]] = defaultdict(list)  # node -> dequantized tensors it reads
    for node in g.node:
        if node.op_type in QDQ_OPS:
            continue
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = producer.get(dq.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                activation_pairs[name] = (source.input[0], name)
            elif dq.input[0] in inits and name not in weight_score:
                weight_score[name] = _weight_score(dq, inits, floats)
            reads[node.name].append(name)
    noise = {**weight_score, **_activation_scores(qdq, activation_pairs, images[:SENSITIVITY_IMAGES], fixed_batch)}
    scores = {node: float(sum(noise.get(t, 0.0) for t in tensors)) for node, tensors in reads.items()}
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def channel_score(signal: np.ndarray, noise: np.ndarray) -> float:
    """Mean over live channels of ``min(noise_c / signal_c, 1)``."""
    signal, noise = np.atleast_1d(signal).astype(np.float64), np.atleast_1d(noise).astype(np.float64)
    live = signal > DEAD_CHANNEL * max(float(np.median(signal)), np.finfo(np.float64).tiny)
    if not live.any():
        return 0.0
    return float(np.mean(np.minimum(noise[live] / signal[live], 1.0)))


def _per_channel(x: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but ``axis`` (x already squared)."""
    if x.ndim == 0:
        return x.reshape(1)
    return x.sum(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))


def _weight_score(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], floats: dict[str, onnx.TensorProto]) -> float:
    """Per-channel noise of a quantized weight against the float weight it replaced.

    ONNX Runtime stores the quantized weight as ``<name>_quantized``. When the float model
    holds ``<name>`` the error is exact; otherwise it is estimated as uniform rounding noise,
    scale^2/12 per value (per-channel symmetric min/max weights are rounded, never clipped).
    """
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    if len(dq.input) < 2 or dq.input[1] not in inits:
        return 0.0
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    has_zero = len(dq.input) > 2 and dq.input[2] in inits
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if has_zero else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if np.ndim(scale) == 1 and scale.size > 1 else 0
    if np.ndim(scale) == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    w = (q - zero) * scale
    original = floats.get(dq.input[0].removesuffix("_quantized"))
    if original is not None and tuple(original.dims) == w.shape:
        exact = numpy_helper.to_array(original).astype(np.float64)
        return channel_score(_per_channel(exact * exact, axis), _per_channel((exact - w) ** 2, axis))
    rounding = np.broadcast_to(scale * scale / 12.0, w.shape)
    return channel_score(_per_channel(w * w, axis), _per_channel(rounding, axis))


def _activation_scores(qdq: onnx.ModelProto, pairs: dict[str, tuple[str, str]], images: np.ndarray,
                       fixed_batch: Optional[int]) -> dict[str, float]:
    """Per-channel noise of each quantized activation (channel = axis 1), measured on ``images``."""
    if not pairs:
        return {}
    graph_inputs = {i.name for i in qdq.graph.input}
    names = sorted({t for pair in pairs.values() for t in pair} - graph_inputs)
    sess = session(with_outputs(qdq, names))
    input_name = sess.get_inputs()[0].name
    signal: dict[str, np.ndarray] = {}
    noise: dict[str, np.ndarray] = {}
    for batch, n in batches(images, fixed_batch, _CHUNK):
        values = dict(zip(names, sess.run(names, {input_name: batch})))
        values.update({name: batch for name in graph_inputs})
        for key, (x_name, dq_name) in pairs.items():
            if values[x_name].ndim < 2 or len(values[x_name]) != len(batch):
                continue  # a scalar or shape computation (a graph left unsimplified pads by computed amounts)
            x, d = values[x_name][:n].astype(np.float64), values[dq_name][:n].astype(np.float64)
            axis = 1 if x.ndim >= 2 else 0
            s, e = _per_channel(x * x, axis), _per_channel((x - d) ** 2, axis)
            signal[key] = signal[key] + s if key in signal else s
            noise[key] = noise[key] + e if key in noise else e
    return {k: channel_score(signal[k], noise[k]) for k in signal}
