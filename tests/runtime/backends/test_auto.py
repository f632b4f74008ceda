"""device="auto" measures the CPU backends once per model and machine and caches the choice; OpenVINO runs at the
precision the model was verified for; engines name both sides of a version mismatch; `build` needs a GPU."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from runtime_testkit import colour_image

from tledge_runtime import Classifier
from tledge_runtime.backends.nvidia import l4t_release
from tledge_runtime.backends.ov import cpu_supports_bf16
from tledge_runtime.cli import main
from tledge_runtime.model.engine_target import EngineTarget, engine_mismatch

pytest.importorskip("openvino")


def test_auto_measures_once_then_reads_its_cache(models, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TLEDGE_AUTO_MEASURE", "1")
    model = shutil.copy(models["fp32"], tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="tledge_runtime"):
        with Classifier(model) as first:
            chosen = first.backend_name
            assert first.backend_reason.startswith("auto: measured now")
        with Classifier(model) as second:
            assert second.backend_name == chosen and second.backend_reason.startswith("auto: cached choice")
    assert chosen in ("ort-cpu", "openvino")
    choices = json.loads((tmp_path / "cache" / "auto" / "choices.json").read_text())
    (entry,) = choices.values()
    assert entry["backend"] == chosen and set(entry["ms"]) == {"ort-cpu", "openvino"}
    assert all(ms > 0 for ms in entry["ms"].values())
    assert any("measured now" in r.getMessage() for r in caplog.records)  # the choice is explained in the log
    other = tmp_path / "other.onnx"
    other.write_bytes(models["fp16"].read_bytes())  # other content: another key, measured again
    with Classifier(other) as third:
        assert third.backend_reason.startswith("auto: measured now")
    assert len(json.loads((tmp_path / "cache" / "auto" / "choices.json").read_text())) == 2


def test_openvino_runs_fp32_at_fp32_and_bf16_only_by_name(models):
    frames = [colour_image(name, seed=i) for i, name in enumerate(("red", "green", "blue"))]
    with Classifier(models["fp32"], backend="ort-cpu") as ort, Classifier(models["fp32"], backend="openvino") as ov:
        a, b = ort.scores_batch(frames), ov.scores_batch(frames)
        assert ov.backend_name == "openvino" and "f32 inference precision" in ov.backend_reason
    np.testing.assert_allclose(a, b, atol=1e-5)
    if cpu_supports_bf16():
        with Classifier(models["fp32"], backend="openvino-bf16") as bf16:
            assert bf16.backend_name == "openvino-bf16"
            assert bf16.predict(frames[0]).label == "red"


@pytest.mark.parametrize("built, here, words", [
    (EngineTarget("10.3.0", "tensorrt", "8.7", "36.3.0"), EngineTarget("10.3.0", "tensorrt", "8.7", "36.3.0"), None),
    (EngineTarget("10.3.0", "tensorrt", "8.7"), EngineTarget("10.7.0", "tensorrt", "8.7"), "built with tensorrt 10.3.0"),
    (EngineTarget("10.3.0", "tensorrt", "8.7"), EngineTarget("10.3.0", "tensorrt", "9.0"), "compute capability 8.7"),
    (EngineTarget("10.3.0", "tensorrt", "8.7", "36.2.0"), EngineTarget("10.3.0", "tensorrt", "8.7", "36.4.0"),
     "L4T 36.2.0"),
    (EngineTarget("1.2.0", "tensorrt-rtx", "8.9"), EngineTarget("1.2.0", "tensorrt-rtx", "12.0"), None),
    (EngineTarget("1.2.0", "tensorrt-rtx"), EngineTarget("10.3.0", "tensorrt", "8.7"), "tensorrt-rtx 1.2.0"),
])
def test_engine_mismatch_names_both_sides(built, here, words):
    why = engine_mismatch(built, here)
    if words is None:
        assert why is None
    else:
        assert words in why and "this" in why and "\n" not in why


def test_l4t_release_is_read_from_the_jetson_release_file(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    assert l4t_release(release) == "36.3.0"
    assert l4t_release(tmp_path / "missing") == ""
    release.write_text("garbage")
    assert l4t_release(release) == ""


def test_build_needs_the_gpu_the_engine_will_run_on(models, tmp_path, capsys):
    model = shutil.copy(models["fp32"], tmp_path / "m.onnx")
    assert main(["-q", "build", str(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "TensorRT is not installed" in err[0] or "no CUDA GPU here" in err[0]
    assert not (tmp_path / "m.engine").exists()


def test_check_needs_a_reference_set(models, capsys):
    assert main(["-q", "check", str(models["fp32"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "carries no reference set" in err and "re-export" in err
