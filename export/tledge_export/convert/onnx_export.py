"""PyTorch ``nn.Module`` -> fp32 ONNX: traced, simplified with onnxslim, ``onnx.checker`` clean.

Exporter choice. torch 2.14 offers two:

- ``"torchscript"`` (``torch.onnx.export(..., dynamo=False)``), the default here. For the
  convolutional classifiers tledge trains it yields, after onnxslim, the same graph as
  the dynamo exporter (Conv, Clip/Relu, Add, GlobalAveragePool, Flatten, Gemm), in about
  a second instead of ten to fifteen (torch.export's decompositions dominate), and works
  on every torch the package allows (>= 2.2). Its ``GlobalAveragePool`` is quantized by
  ONNX Runtime's QDQ quantizer and maps to one TensorRT pooling layer; the dynamo
  exporter writes ``ReduceMean`` there, which the quantizer leaves in float. PyTorch has
  deprecated this path; its warning is logged, not shown.
- ``"dynamo"`` (``torch.export``-based, ``dynamo=True``): the exporter PyTorch maintains;
  choose it for models the TorchScript tracer cannot handle, and when torch removes the
  legacy path. Both are tested.

Opset 18 by default: the dynamo exporter's native opset, supported by ONNX Runtime
>= 1.14 and by the ONNX parsers of TensorRT 10 / 11 and TensorRT for RTX.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Optional

import onnx
import torch

from tledge_export.artifact import check, name_nodes
from tledge_export.config import EXPORTERS
from tledge_export.convert.ood_head import SCORE_NAME
from tledge_export.convert.static_padding import static_same_padding
from tledge_export.errors import ExportError
from tledge_runtime.errors import first_line
from tledge_runtime.model.meta import Preprocess

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"
# Opsets each exporter writes: the TorchScript exporter stops at 20; the dynamo exporter
# writes 18 natively and converts to others with the ONNX version converter (18 and up).
OPSETS = {"torchscript": range(13, 21), "dynamo": range(18, 22)}


def export_onnx(model: torch.nn.Module, preprocess: Preprocess, num_classes: int, *, batch: Optional[int] = None,
                opset: int = 18, exporter: str = "torchscript") -> onnx.ModelProto:
    """The fp32 ONNX graph of ``model``: input ``input`` (N, 3, H, W) float32, output ``logits`` (N, classes),
    and ``ood_score`` (N, 1) when the model returns ``(logits, score)`` (:class:`~tledge_export.convert.ood_head.WithScore`).

    ``batch=None`` makes the batch axis dynamic; an integer fixes it.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}", hint=f"choose one of {', '.join(EXPORTERS)}")
    if opset not in OPSETS[exporter]:
        r = OPSETS[exporter]
        raise ExportError(f"the {exporter} exporter writes opsets {r.start}..{r.stop - 1}, not {opset}",
                          hint="use --opset 18" + (" or --exporter torchscript" if exporter == "dynamo" else ""))
    model = static_same_padding(model.eval().float().cpu(), preprocess.height, preprocess.width)
    # Trace with 2 images when the batch is dynamic, so no exporter specializes the batch axis to 1.
    example = torch.zeros(batch or 2, 3, preprocess.height, preprocess.width)
    try:
        with torch.no_grad():
            names = _output_names(model, example)
            run = _dynamo if exporter == "dynamo" else _torchscript
            proto = run(model, example, batch, opset, names)
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types; all mean "this model did not export"
        first = first_line(e)
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        raise ExportError(f"torch.onnx ({exporter}) could not export the model: {first}",
                          hint=f"try --exporter {other}, or another --opset") from None
    proto = simplify(proto)
    name_nodes(proto)
    check(proto, "fp32")
    _check_io(proto, preprocess, num_classes, batch)
    return proto


def _output_names(model: torch.nn.Module, example: torch.Tensor) -> list[str]:
    """``logits``, and ``ood_score`` when the model also returns an out-of-distribution score."""
    out = model(example)
    return [OUTPUT_NAME, SCORE_NAME] if isinstance(out, (tuple, list)) and len(out) == 2 else [OUTPUT_NAME]


def _torchscript(model: torch.nn.Module, example: torch.Tensor, batch: Optional[int], opset: int,
                 names: list[str]) -> onnx.ModelProto:
    buf = io.BytesIO()
    dynamic = None if batch else {name: {0: BATCH_DIM} for name in [INPUT_NAME, *names]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=dynamic, do_constant_folding=True)
    for w in caught:  # the deprecation notice of the legacy path, among others: for the log, not the user's screen
        log.debug("torch.onnx: %s", first_line(Exception(w.message)))
    return onnx.load_from_string(buf.getvalue())


def _dynamo(model: torch.nn.Module, example: torch.Tensor, batch: Optional[int], opset: int,
            names: list[str]) -> onnx.ModelProto:
    shapes = None if batch else ({0: torch.export.Dim(BATCH_DIM, min=1, max=65536)},)
    # The dynamo exporter prints its progress on stdout; stdout belongs to the CLI's table / --json output.
    with contextlib.redirect_stdout(io.StringIO()) as printed, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=names, dynamic_shapes=shapes, optimize=True, verbose=False)
    log.debug("torch.onnx (dynamo): %s", printed.getvalue().strip().replace("\n", " | "))
    proto = program.model_proto
    if not batch:
        # torch.export names the symbol after its own conventions (s0, s77, ...); the contract says "batch".
        for value in (*proto.graph.input, *proto.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            if not dim.HasField("dim_value"):
                dim.dim_param = BATCH_DIM
    return proto


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding, dead-node removal, pattern fusion. The exported graph is correct
    without it, so a simplifier failure is logged and the unsimplified graph kept."""
    import onnxslim

    try:
        slim = onnxslim.slim(model)
    except Exception as e:  # onnxslim raises whatever its passes raise
        log.warning("onnxslim could not simplify the graph (%s); keeping it as exported", first_line(e))
        return model
    if not isinstance(slim, onnx.ModelProto):
        return model
    # A fusion can change the numbers (onnxslim 0.1.98 moves EfficientNet-Lite1's logits by ~0.1): the
    # simplified graph must compute what the exported one computes, or the exported one is kept.
    diff = _probe_difference(model, slim)
    if diff > SLIM_TOLERANCE:
        log.warning("onnxslim changed the graph's outputs (max |diff| %.3g on a probe input); keeping it as "
                    "exported", diff)
        return model
    return slim


SLIM_TOLERANCE = 1e-4  # relative to the output's scale: float32 re-association moves logits by ~1e-6; a wrong fusion by 1e-2+


def _probe_difference(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    """Largest |difference| of the first outputs of graphs ``a`` and ``b`` on one seeded random input."""
    import numpy as np
    import onnxruntime as ort

    dims = a.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else 2 for d in dims]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    outs = []
    for graph in (a, b):
        sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {sess.get_inputs()[0].name: x}))
    # every output: a fusion that breaks the out-of-distribution score matters as much as one that breaks logits
    return max(float(np.abs(p - q).max() / max(1.0, float(np.abs(p).max()))) for p, q in zip(*outs))


def _check_io(model: onnx.ModelProto, p: Preprocess, num_classes: int, batch: Optional[int]) -> None:
    """The graph must be what the metadata will say: one (N,3,H,W) input, an (N,classes) output and, for a model
    with an out-of-distribution score, an (N,1) one."""
    g = model.graph
    if len(g.input) != 1 or len(g.output) not in (1, 2):
        raise ExportError(f"the exported graph has {len(g.input)} inputs and {len(g.output)} outputs, expected 1 and "
                          "1 (or 2 with an out-of-distribution score)",
                          hint="tledge exports single-input classifiers, with one optional score output")
    dims_in = _dims(g.input[0])
    dims_out = _dims(g.output[0])
    n = batch if batch else BATCH_DIM
    if len(g.output) == 2 and (g.output[1].name != SCORE_NAME or _dims(g.output[1]) != [n, 1]):
        raise ExportError(f"the second output is {g.output[1].name!r} {_dims(g.output[1])}, expected {SCORE_NAME!r} "
                          f"{[n, 1]}", hint="wrap the model with tledge_export.convert.ood_head.WithScore")
    if dims_in != [n, 3, p.height, p.width] or dims_out != [n, num_classes]:
        raise ExportError(f"the exported graph maps {dims_in} to {dims_out}, expected "
                          f"{[n, 3, p.height, p.width]} to {[n, num_classes]}",
                          hint="the model does not match its checkpoint's preprocessing or labels")


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
