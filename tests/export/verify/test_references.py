"""Every exported model carries its reference set, and `tledge-runtime check` replays it: every format passes on
onnxruntime and OpenVINO; a copy with changed preprocessing or a scaled weight fails, naming the stage."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tledge_export import ExportConfig
from tledge_export.artifact import embed_meta, read_meta
from tledge_export.verify.references import MAX_BYTES, size_of
from tledge_runtime.cli import main as runtime_main
from tledge_runtime.model_check import check_model

FORMATS = ("model.onnx", "model.fp16.onnx", "model.int8.onnx")


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_carries_a_reference_set_and_passes_on_every_backend(exported, name):
    path = exported.out / name
    refs = read_meta(path).reference_set
    assert refs is not None and refs.images == 8 and len(refs.items) == 10  # 8 images + 2 synthetic
    assert size_of(refs) <= min(0.05 * path.stat().st_size, MAX_BYTES)
    report = check_model(path, ["ort-cpu", "openvino"])
    assert report.ok, report.table()
    assert [b.backend for b in report.backends] == ["ort-cpu", "openvino"]
    assert all(b.agreement == 1.0 for b in report.backends)


def _tampered(src, dst, **preprocess_changes):
    model = onnx.load(str(src))
    meta = read_meta(model)
    embed_meta(model, meta.with_(preprocess=replace(meta.preprocess, **preprocess_changes)))
    onnx.save(model, str(dst))
    return dst


def test_changed_preprocessing_is_named_by_its_stage(exported, tmp_path):
    src = exported.out / "model.onnx"
    mean = _tampered(src, tmp_path / "mean.onnx", mean=(0.4, 0.4, 0.4))
    report = check_model(mean, ["ort-cpu"])
    stages = {s.name: s.ok for s in report.preprocessing}
    assert stages == {"decode": True, "resize": True, "normalize": False}, report.table()
    assert not report.ok and "normalize" in report.failures()[0]
    resized = _tampered(src, tmp_path / "crop.onnx", crop_ratio=0.8)
    stages = {s.name: s.ok for s in check_model(resized, ["ort-cpu"]).preprocessing}
    assert stages == {"decode": True, "resize": False, "normalize": True}


def test_a_scaled_weight_fails_the_numerics_and_the_cli_exits_1(exported, tmp_path, capsys):
    model = onnx.load(str(exported.out / "model.onnx"))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    path = tmp_path / "scaled.onnx"
    onnx.save(model, str(path))
    report = check_model(path, ["ort-cpu"])
    assert all(s.ok for s in report.preprocessing) and not report.backends[0].ok
    assert "outside |Δlogit| <=" in report.backends[0].detail
    capsys.readouterr()  # what the API calls logged so far
    assert runtime_main(["-q", "check", str(path), "--backend", "ort-cpu"]) == 1
    out, err = capsys.readouterr()
    assert re.search(r"numerics\s+ort-cpu\s+DIFFERS", out)
    assert err.strip().startswith("error: ") and "reference check failed" in err
    assert runtime_main(["-q", "check", str(exported.out / "model.int8.onnx"), "--backend", "all", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and {b["backend"] for b in report["backends"]} >= {"ort-cpu", "openvino"}


def test_classifier_check_refuses_a_failing_model(exported, tmp_path):
    from tledge_runtime import Classifier
    from tledge_runtime.errors import CheckFailed

    bad = _tampered(exported.out / "model.onnx", tmp_path / "bad.onnx", std=(0.3, 0.3, 0.3))
    with pytest.raises(CheckFailed, match="normalize"):
        Classifier(bad, check=True)
    with Classifier(exported.out / "model.int8.onnx", check=True) as clf:
        assert clf.self_check().ok


def test_no_reference_images_keeps_synthetic_inputs_only(tiny_run, tmp_path):
    from tledge.exporting import export_checkpoint

    result = export_checkpoint(tiny_run.best, ExportConfig(out=str(tmp_path), reference_images=0), workers=2)
    refs = read_meta(result.get("fp32").path).reference_set
    assert refs.images == 0 and len(refs.items) == 2 and all(item.synthetic for item in refs.items)
    assert check_model(result.get("fp32").path, ["ort-cpu"]).ok
    synthetic = [np.asarray(item.logits) for item in refs.items]
    assert all(np.isfinite(s).all() for s in synthetic)
