"""--bake-preprocess: uint8 NHWC in, normalization inside the graph, same answers as the float model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tledge.data.folders import Splits
from tledge_export.artifact import read_meta
from tledge_runtime import Classifier


def test_baked_models_take_uint8_nhwc_and_agree_with_the_float_model(exported_cli, exported, held_out):
    float_model = ort.InferenceSession(str(exported.out / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = float_model.run(None, {"input": held_out.x})[0]
    for name in ("model.onnx", "model.fp16.onnx", "model.int8-trt.onnx"):
        path = exported_cli.out / name
        meta = read_meta(path)
        assert (meta.input.layout, meta.input.dtype, meta.input.baked_preprocess) == ("NHWC", "uint8", True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = sess.get_inputs()[0]
        assert spec.type == "tensor(uint8)" and spec.shape == ["batch", 32, 32, 3]
        logits = sess.run(None, {"input": held_out.images})[0]
        agreement = (logits.argmax(1) == held_out.logits.argmax(1)).mean()
        assert agreement == pytest.approx(meta.verification.agreement) and agreement >= 0.9, name
        if name == "model.onnx":  # same float32 arithmetic as the runtime's Normalizer: equal to float round-off
            np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_runtime_classifier_reads_baked_and_float_files_alike(exported_cli, exported, tiny_run):
    splits = Splits.from_json((tiny_run.out / "split.json").read_text())
    files = [str(s.path) for s in splits.test]
    truth = [splits.classes[s.label] for s in splits.test]
    with Classifier(exported_cli.out / "model.onnx", device="cpu") as baked, \
            Classifier(exported.out / "model.onnx", device="cpu") as plain:
        a, b = baked.predict_batch(files), plain.predict_batch(files)
    assert [p.label for p in a] == [p.label for p in b] == truth
    assert np.allclose([p.score for p in a], [p.score for p in b], atol=1e-5)


def test_baked_graph_normalizes_inside(exported_cli):
    model = onnx.load(str(exported_cli.out / "model.onnx"))
    first = [n.op_type for n in model.graph.node[:4]]
    assert first == ["Cast", "Mul", "Add", "Transpose"]
