"""tledge engine files (header + TensorRT plan) and the native TensorRT backend.

The engine-file format is tested everywhere. The TensorRT backend itself needs an
NVIDIA GPU: here it must refuse cleanly (BackendError with a hint); the tests
marked ``gpu`` run real engines where a GPU and TensorRT exist.
"""

from __future__ import annotations

import importlib.util
import struct

import numpy as np
import pytest
from runtime_testkit import LABELS, build_engine_plan, make_meta

from tledge_runtime import Classifier
from tledge_runtime.backends.engine_file import MAGIC, is_engine_file, read_engine, write_engine
from tledge_runtime.backends.loader import cuda_device_count, read_meta
from tledge_runtime.errors import BackendError, MetadataError, ModelError

HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx_bindings"))
HAVE_GPU = bool(cuda_device_count())


def test_round_trip_keeps_metadata_and_plan_bytes(tmp_path):
    meta = make_meta()
    plan = bytes(range(256)) * 10
    path = write_engine(tmp_path / "m.engine", meta, plan)
    assert is_engine_file(path)
    got_meta, got_plan = read_engine(path)
    assert got_meta == meta and got_plan == plan
    assert read_meta(path) == meta  # `info` reads it without TensorRT
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, no leftovers


def test_onnx_and_missing_files_are_not_engines(models, tmp_path):
    assert not is_engine_file(models["fp32"])
    assert not is_engine_file(tmp_path / "missing.engine")


@pytest.mark.parametrize("mutate, error, expected", [
    (lambda blob: b"PLAN" + blob[4:], MetadataError, "not a tledge engine"),
    (lambda blob: blob[: len(MAGIC) + 2], MetadataError, "truncated"),
    (lambda blob: MAGIC + struct.pack("<I", 1 << 30) + blob[len(MAGIC) + 4:], MetadataError, "declares"),
    (lambda blob: MAGIC + struct.pack("<I", 5) + b"{oops" + b"plan", MetadataError, "not valid JSON"),
    (lambda blob: blob[: len(blob) - 64], ModelError, "no engine"),  # header intact, plan cut away
])
def test_corrupt_engine_files_are_refused(tmp_path, mutate, error, expected):
    path = write_engine(tmp_path / "m.engine", make_meta(), b"x" * 64)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(error) as e:
        read_engine(path)
    assert expected in e.value.message and e.value.hint
    with pytest.raises((MetadataError, ModelError, BackendError)):
        Classifier(path)


def test_engine_with_newer_schema_is_refused(tmp_path):
    meta = make_meta().with_(schema_version=99)
    path = write_engine(tmp_path / "m.engine", meta, b"plan")
    with pytest.raises(MetadataError) as e:
        Classifier(path)
    assert "upgrade" in e.value.hint


def test_engine_cannot_run_on_cpu_or_onnxruntime(tmp_path):
    path = write_engine(tmp_path / "m.engine", make_meta(), b"plan")
    for kwargs, expected in (({"device": "cpu"}, "needs an NVIDIA GPU"),
                             ({"backend": "ort-cpu"}, "only on backend 'tensorrt'"),
                             ({"backend": "openvino"}, "only on backend 'tensorrt'")):
        with pytest.raises(BackendError) as e:
            Classifier(path, **kwargs)
        assert expected in e.value.message and ".onnx" in e.value.hint


@pytest.fixture(scope="module")
def engine_file(models, tmp_path_factory):
    """A real TensorRT engine of the fp32 test graph, with the tledge header."""
    if not HAVE_TRT:
        pytest.skip("neither tensorrt nor tensorrt_rtx_bindings is installed")
    try:
        plan = build_engine_plan(models["fp32"])
    except RuntimeError as e:
        pytest.skip(f"this TensorRT cannot build the test engine here: {e}")
    return write_engine(tmp_path_factory.mktemp("engine") / "fp32.engine", make_meta(), plan)


@pytest.mark.tensorrt
@pytest.mark.skipif(HAVE_GPU, reason="a GPU is present: the engine runs (see the gpu tests)")
def test_real_engine_without_a_gpu_is_a_backend_error(engine_file):
    assert read_meta(engine_file).labels == LABELS
    with pytest.raises(BackendError) as e:
        Classifier(engine_file)
    assert "GPU" in e.value.message and ".onnx" in e.value.hint


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAVE_GPU, reason="needs an NVIDIA GPU")
def test_real_engine_on_a_gpu_agrees_with_onnxruntime(engine_file, models, images):
    files = [f for fs in images.values() for f in fs]
    with Classifier(engine_file) as trt, Classifier(models["fp32"], device="cpu") as ort:
        assert trt.backend_name == "tensorrt"
        assert trt.max_batch == 8
        np.testing.assert_allclose(trt.scores_batch(files), ort.scores_batch(files), atol=2e-3)
        assert [p.label for p in trt.predict_batch(files * 3)] == [p.label for p in ort.predict_batch(files * 3)]
