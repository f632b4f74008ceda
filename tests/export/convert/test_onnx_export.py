"""fp32 ONNX: plain onnxruntime loads it, its metadata is the contract, it matches PyTorch, dynamic batch works."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tledge.train.checkpoint import file_sha256
from tledge_export.config import FP32_ATOL, FP32_RTOL
from tledge_export.convert.onnx_export import export_onnx
from tledge_runtime.model.meta import ONNX_KEY, ModelMeta, Preprocess


def _meta(path) -> ModelMeta:
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return ModelMeta.from_json(props[ONNX_KEY])


def test_every_file_loads_with_plain_onnxruntime_and_carries_its_metadata(exported, tiny_run):
    expected = {"fp32": ("model.onnx", None), "fp16": ("model.fp16.onnx", None), "int8": ("model.int8.onnx", "cpu")}
    assert exported.ok, exported.table()
    for fmt, (name, target) in expected.items():
        path = exported.out / name
        meta = _meta(path)
        assert meta.precision == fmt
        assert meta.labels == ("blue", "green", "red")
        assert meta.provenance.architecture == "efficientnet_lite0"
        assert meta.provenance.checkpoint_sha256 == file_sha256(tiny_run.best)
        assert meta.provenance.opset == 18 and meta.provenance.created.endswith("+00:00")
        assert meta.input.dtype == "float32" and meta.input.batch is None and not meta.input.baked_preprocess
        assert (meta.quantization.target if meta.quantization else None) == target
        v = meta.verification
        assert v.passed and v.images == 15 and "val+test" in v.data and v.reference.startswith("PyTorch")
        assert v.agreement == 1.0 if fmt == "fp32" else v.agreement >= 0.9
        assert v.measured.endswith("+00:00") and sum(c.images for c in v.per_class) == v.images
    report = json.loads((exported.out / "report.json").read_text())
    assert report["ok"] and [f["format"] for f in report["formats"]] == ["fp32", "fp16", "int8"]
    assert report["images"] == {"verification": 15, "verification_data": "held-out val+test split of run",
                                "calibration": 33}


def test_fp32_matches_pytorch_within_budget_on_held_out_images(exported, held_out):
    sess = ort.InferenceSession(str(exported.out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": held_out.x})[0]
    assert np.all(np.abs(logits - held_out.logits) <= FP32_ATOL + FP32_RTOL * np.abs(held_out.logits))
    assert (logits.argmax(1) == held_out.logits.argmax(1)).all()
    recorded = exported.get("fp32").parity
    assert recorded.max_abs_diff == pytest.approx(float(np.abs(logits - held_out.logits).max()), rel=0.5, abs=1e-6)


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch_runs_batch_1_and_5(exported, held_out, batch):
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        sess = ort.InferenceSession(str(exported.out / name), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[0] == "batch"
        out = sess.run(None, {"input": held_out.x[:batch]})[0]
        assert out.shape == (batch, 3)
        everything = sess.run(None, {"input": held_out.x})[0]
        np.testing.assert_allclose(out, everything[:batch], atol=1e-5)


def test_graph_is_checker_clean_and_simplified(exported):
    model = onnx.load(str(exported.out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    # onnxslim folded every BatchNorm into its convolution and every shape computation away.
    assert "BatchNormalization" not in ops and "Constant" not in ops and "Shape" not in ops
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]


class _Tiny(torch.nn.Module):
    """Conv -> ReLU -> global pool -> Linear: enough graph to exercise an exporter quickly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_exporters_dynamic_and_fixed_batch(exporter):
    prep = Preprocess(height=16, width=16)
    model = _Tiny().eval()
    x = torch.randn(5, 3, 16, 16)
    ref = model(x).detach().numpy()
    dynamic = export_onnx(model, prep, 4, opset=18, exporter=exporter)
    dims = [d.dim_param or d.dim_value for d in dynamic.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 16, 16]
    sess = ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        np.testing.assert_allclose(sess.run(None, {"input": x[:n].numpy()})[0], ref[:n], atol=1e-5)
    fixed = export_onnx(model, prep, 4, batch=2, opset=18, exporter=exporter)
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 16, 16]
    sess = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x[:2].numpy()})[0], ref[:2], atol=1e-5)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        sess.run(None, {"input": x[:3].numpy()})


def test_exporter_refuses_an_opset_it_cannot_write():
    from tledge_export.errors import ExportError

    with pytest.raises(ExportError, match="writes opsets 13..20, not 21"):
        export_onnx(_Tiny(), Preprocess(height=16, width=16), 4, opset=21, exporter="torchscript")


def _lite1():
    from tledge.models import create_model, default_preprocess

    torch.manual_seed(0)
    return create_model("efficientnet_lite1", 2, weights="none").eval(), default_preprocess("efficientnet_lite1")


def _as_traced(model, p):
    """The graph as the tracer writes it from timm's dynamic TF-"same" padding: no static padding, no onnxslim."""
    from tledge_export.convert.onnx_export import _torchscript

    with torch.no_grad():
        return _torchscript(model, torch.zeros(2, 3, p.height, p.width), None, 18, ["logits"])


def test_efficientnet_lite1_exports_a_static_graph_with_the_numbers_pytorch_computes():
    """timm computes EfficientNet-Lite's TF-"same" padding from the input's shape at run time; the input size is
    fixed, so export makes it constant: no shape arithmetic in the graph, the same logits."""
    model, p = _lite1()
    x = torch.randn(2, 3, p.height, p.width)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_onnx(model, p, 2)
    assert {n.op_type for n in proto.graph.node} <= {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert {n.op_type for n in _as_traced(model, p).graph.node} >= {"Shape", "Ceil", "Pad"}  # what it replaced
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("size", [(33, 37), (64, 48)])
def test_static_same_padding_computes_what_timm_computes(size):
    """Odd and even sizes (the odd pixel of TF-"same" padding goes right/bottom); the caller's model is untouched."""
    from timm.layers import Conv2dSame

    from tledge.models import create_model
    from tledge_export.convert.static_padding import static_same_padding

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, weights="none").eval()
    static = static_same_padding(model, *size)
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    assert any(isinstance(m, Conv2dSame) for m in model.modules())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(static(x), model(x), atol=0, rtol=0)
    assert static_same_padding(_Tiny(), 16, 16).__class__ is _Tiny  # nothing to replace: the model itself


def test_simplify_keeps_the_graph_as_exported_when_onnxslim_changes_its_numbers(caplog):
    """onnxslim 0.1.98 folds EfficientNet-Lite1's traced dynamic-padding graph into one whose logits are ~0.1 off
    (found when a real ELPV Lite1 run failed its fp32 export); the simplified graph is checked and dropped."""
    from tledge_export.convert.onnx_export import simplify

    model, p = _lite1()
    traced = _as_traced(model, p)
    with caplog.at_level("WARNING", logger="tledge_export"):
        kept = simplify(traced)
    assert "onnxslim changed the graph's outputs" in caplog.text and kept is traced


def test_int8_sensitivity_ranks_an_unsimplified_lite1_graph():
    """A graph that computes padding from shapes (as traced from timm, before export makes it static; a user's
    model may do the same): int8 quantizes some of that scalar arithmetic. The accuracy-aware ranking must rank
    image activations and skip it."""
    from tledge_export.int8.quantize import Quantizer
    from tledge_export.int8.sensitivity import rank_nodes

    model, p = _lite1()
    proto = _as_traced(model, p)
    calib = np.random.default_rng(0).standard_normal((4, 3, p.height, p.width)).astype(np.float32)
    with Quantizer(proto, calib) as q:
        ranking = rank_nodes(q.quantize(), calib, float_model=proto)
    assert len(ranking) > 20 and all(np.isfinite(score) for _, score in ranking)
