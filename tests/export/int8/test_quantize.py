"""int8 QDQ flavours: what the graphs contain (zero points, types, per-channel scales, biases) and their metadata."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from tledge_export.artifact import read_meta


def _qdq(path):
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequant = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return model, inits, quant, dequant


def _conv_weight_dqs(model, inits, dequant, float_nodes=()):
    """The DequantizeLinear nodes that feed Conv weights (of the convolutions not kept in float)."""
    by_output = {n.output[0]: n for n in dequant}
    found = []
    for conv in (n for n in model.graph.node if n.op_type == "Conv" and n.name not in float_nodes):
        dq = by_output.get(conv.input[1])
        assert dq is not None and dq.input[0] in inits, f"{conv.name}: weight is not quantized"
        found.append((conv, dq))
    return found


def test_cpu_flavour_uint8_activations_per_channel_int8_weights(exported, held_out):
    path = exported.out / "model.int8.onnx"
    model, inits, quant, dequant = _qdq(path)
    assert len(quant) > 40
    for q in quant:  # every activation quantizer: uint8, asymmetric (zero points not all 0)
        assert inits[q.input[2]].data_type == TensorProto.UINT8
    assert any(numpy_helper.to_array(inits[q.input[2]]).item() != 0 for q in quant)
    float_nodes = read_meta(path).quantization.float_nodes
    for conv, dq in _conv_weight_dqs(model, inits, dequant, float_nodes):
        w = inits[dq.input[0]]
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert w.data_type == TensorProto.INT8
        assert scale.shape == (w.dims[0],), f"{conv.name}: not per output channel"
        assert not numpy_helper.to_array(inits[dq.input[2]]).any()  # symmetric weights
    # ORT's CPU kernels take int32 biases (input scale x weight scale).
    assert any(inits[d.input[0]].data_type == TensorProto.INT32 for d in dequant if d.input[0] in inits)
    meta = read_meta(path)
    q = meta.quantization
    assert (meta.precision, q.target, q.method, q.activation_type, q.weight_type, q.per_channel) == (
        "int8", "cpu", "minmax", "uint8", "int8", True)
    # Accuracy-aware int8 may keep nodes in float (a near-tie held-out image can flip); the file says which.
    assert q.calibration_images == 33
    assert list(q.float_nodes) == exported.get("int8").details["accuracy_aware"]["float_nodes"]
    assert meta.verification.budget.to_dict() == {"kind": "accuracy", "max_drop_points": 1.0, "min_agreement": 99.0,
                                                  "rule": "paired"}
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": held_out.x})[0]
    agreement = (logits.argmax(1) == held_out.logits.argmax(1)).mean()
    assert agreement == pytest.approx(meta.verification.agreement) and meta.verification.passed
    drop = 100 * ((held_out.logits.argmax(1) == held_out.labels).mean() - (logits.argmax(1) == held_out.labels).mean())
    assert drop <= 1.0


def test_tensorrt_flavour_symmetric_int8_zero_points_and_float_biases(exported_cli, held_out):
    path = exported_cli.out / "model.int8-trt.onnx"
    model, inits, quant, dequant = _qdq(path)
    for node in quant + dequant:
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8, f"{node.name}: zero point type {zp.data_type}"
        assert not numpy_helper.to_array(zp).any(), f"{node.name}: zero point is not 0"
    # No int32 bias: TensorRT's parser rejects DequantizeLinear of INT32.
    assert all(inits[d.input[0]].data_type != TensorProto.INT32 for d in dequant if d.input[0] in inits)
    weight_dqs = _conv_weight_dqs(model, inits, dequant, read_meta(path).quantization.float_nodes)
    assert all(numpy_helper.to_array(inits[dq.input[1]]).shape == (inits[dq.input[0]].dims[0],) for _, dq in weight_dqs)
    meta = read_meta(path)
    q = meta.quantization
    assert (q.target, q.method, q.activation_type) == ("tensorrt", "percentile", "int8")
    assert meta.input.baked_preprocess and meta.input.dtype == "uint8"
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": held_out.images})[0]
    agreement = (logits.argmax(1) == held_out.logits.argmax(1)).mean()
    assert agreement == pytest.approx(meta.verification.agreement) and meta.verification.passed
    assert np.abs(logits - held_out.logits).max() < 1.0


def test_quantization_aware_int8_through_the_cli(tiny_run, tmp_path):
    """--qat on: fine-tuned through simulated int8 with the fp32 model as teacher, written by the same QDQ
    quantizer (same flavour, same verification), its recipe in report.json and the method in the metadata."""
    import json

    from click.testing import CliRunner

    from tledge.cli.main import main

    pytest.importorskip("modelopt")
    out = tmp_path / "qat"
    result = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--int8", "--qat", "on",
                                       "--qat-epochs", "1", "--calib-size", "16", "--budget", "100", "--min-agreement", "0",
                                       "--json", "--workers", "2"])
    assert result.exit_code == 0, result.output
    int8 = next(f for f in json.loads(result.stdout)["formats"] if f["format"] == "int8")
    assert int8["qat"]["library"].startswith("nvidia-modelopt") and int8["qat"]["steps"] == 1
    assert int8["qat"]["hflip"] is True  # as the run trained (its classes look the same mirrored)
    assert "post_training" not in int8  # asked for: no post-training attempt first
    meta = read_meta(out / "model.int8.onnx")
    assert meta.quantization.method == "qat" and meta.quantization.activation_type == "uint8"
    assert meta.verification.passed and meta.reference_set is not None
    ops = {n.op_type for n in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
