"""Every bad input is the right error type, with a message that names the problem and a hint that fixes it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from runtime_testkit import build_graph, colour_image, make_meta, meta_dict, write_model

from tledge_runtime import Classifier
from tledge_runtime.backends.loader import read_meta
from tledge_runtime.errors import BackendError, ImageError, MetadataError, ModelError, TledgeError
from tledge_runtime.model.meta import SCHEMA_VERSION, InputSpec, OutputSpec


def _raises(exc_type, fn, *args, match: str, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    err = info.value
    assert match in err.message, err.message
    assert err.hint, f"no hint on {err!r}"
    return err


# ------------------------------------------------------------------ images


def test_image_errors(classifier, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.png"
    from PIL import Image

    Image.fromarray(colour_image("red", 1, (64, 64))).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    cases = [
        (tmp_path / "missing.png", "no such file"),
        (tmp_path, "directory"),
        (text, "not an image"),
        (empty, "empty file"),
        (truncated, "truncated"),
        (b"\x89PNG garbage", "<bytes>"),
        (np.zeros((3, 16, 16), np.uint8), "shape"),  # CHW, not HWC
        (np.zeros((2, 16, 16, 3), np.uint8), "shape"),  # a batch, not a frame
        (np.zeros((16, 16, 3), np.float32), "dtype"),
        (np.zeros((0, 16, 3), np.uint8), "shape"),
        (12345, "int"),
        (None, "NoneType"),
    ]
    for source, expected in cases:
        err = _raises(ImageError, classifier.predict, source, match=expected)
        assert isinstance(err, TledgeError)
    _raises(ImageError, classifier.predict, colour_image("red", 1), channel_order="hsv", match="channel_order")


def test_one_bad_image_fails_the_batch_with_its_name(classifier, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a nonsense")
    _raises(ImageError, classifier.predict_batch, [colour_image("red", 1), bad], match="bad.jpg")


# ------------------------------------------------------------------ model files and metadata


def test_missing_and_unreadable_model_files(tmp_path):
    _raises(ModelError, Classifier, tmp_path / "nope.onnx", match="no such model file")
    _raises(ModelError, Classifier, tmp_path, match="not a file")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    _raises(ModelError, Classifier, garbage, match="cannot load")
    _raises(ModelError, read_meta, tmp_path / "nope.onnx", match="no such model file")


def test_model_without_metadata_is_refused(tmp_path):
    path = write_model(tmp_path / "plain.onnx", no_meta=True)
    err = _raises(MetadataError, Classifier, path, match="no tledge metadata")
    assert "tledge export" in err.hint
    _raises(MetadataError, read_meta, path, match="no tledge metadata")


@pytest.mark.parametrize("text, expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({k: v for k, v in meta_dict().items() if k != "schema_version"}), "no schema_version"),
    (json.dumps(meta_dict(labels=["only-one"])), "at least 2 labels"),
    (json.dumps({k: v for k, v in meta_dict().items() if k != "preprocess"}), "lacks the field 'preprocess'"),
    (json.dumps(meta_dict(precision="int3")), "unknown precision"),
])
def test_unparsable_metadata_is_refused(tmp_path, text, expected):
    path = write_model(tmp_path / "bad.onnx", meta_json=text)
    err = _raises(MetadataError, Classifier, path, match=expected)
    assert str(path) in err.message


def test_newer_schema_version_is_refused_with_an_upgrade_hint(tmp_path):
    path = write_model(tmp_path / "future.onnx", meta_json=json.dumps(meta_dict(schema_version=SCHEMA_VERSION + 1)))
    err = _raises(MetadataError, Classifier, path, match=f"schema version {SCHEMA_VERSION + 1}")
    assert "upgrade" in err.hint
    newer_field = write_model(tmp_path / "newer.onnx", meta_json=json.dumps(meta_dict(colour_space="P3")))
    err = _raises(MetadataError, Classifier, newer_field, match="unknown model metadata field")
    assert "upgrade" in err.hint


@pytest.mark.parametrize("graph_kwargs, meta_kwargs, expected", [
    ({"classes": 4}, {}, "4 classes"),
    ({}, {"labels": ("a", "b")}, "3 classes"),
    ({"size": 24}, {}, "24x24"),
    ({"channels": 1}, {}, "1 channels"),
    ({"batch": 4}, {"batch": 2}, "batch 4"),
    ({"input_name": "pixels"}, {}, "named 'pixels'"),
])
def test_graph_that_contradicts_its_metadata_is_refused(tmp_path, graph_kwargs, meta_kwargs, expected):
    graph, meta = build_graph("fp32", **graph_kwargs), make_meta(**meta_kwargs)
    path = write_model(tmp_path / "mismatch.onnx", graph=graph, meta=meta)
    err = _raises(ModelError, Classifier, path, match=expected)
    assert "re-export" in err.hint


def test_input_dtype_that_contradicts_the_metadata_is_refused(tmp_path):
    meta = make_meta().with_(input=InputSpec(name="input", layout="NCHW", dtype="uint8"))
    path = write_model(tmp_path / "a.onnx", graph=build_graph("fp32"), meta=meta)
    _raises(ModelError, Classifier, path, match="graph input is float32, the metadata says uint8")
    baked_graph = write_model(tmp_path / "b.onnx", graph=build_graph("baked"), meta=make_meta("fp32"))
    _raises(ModelError, Classifier, baked_graph, match="16 channels in NCHW layout")  # uint8 NHWC read as NCHW


def test_wrong_output_name_and_rank(tmp_path):
    meta = make_meta().with_(output=OutputSpec(name="scores"))
    path = write_model(tmp_path / "out.onnx", graph=build_graph("fp32"), meta=meta)
    _raises(ModelError, Classifier, path, match="no output named 'scores'")
    path = write_model(tmp_path / "rank.onnx", graph=build_graph("fp32", pooled_output=True), meta=make_meta())
    _raises(ModelError, Classifier, path, match="expected (batch, classes)")


# ------------------------------------------------------------------ backends and devices


def test_unknown_backend_device_and_threads(models):
    _raises(BackendError, Classifier, models["fp32"], backend="tflite", match="unknown backend")
    _raises(BackendError, Classifier, models["fp32"], device="tpu", match="unknown device")
    _raises(BackendError, Classifier, models["fp32"], threads=0, match="threads")


def test_gpu_backends_missing_here_say_what_to_install(models):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    for kwargs in ({"backend": "ort-cuda"}, {"backend": "ort-tensorrt"}, {"device": "gpu"}, {"device": "cuda"}):
        err = _raises(BackendError, Classifier, models["fp32"], match="", **kwargs)
        assert "onnxruntime-gpu" in err.hint, kwargs


def test_conflicting_backend_and_device(models):
    _raises(BackendError, Classifier, models["fp32"], backend="ort-cpu", device="gpu", match="device='gpu'")
    _raises(BackendError, Classifier, models["fp32"], backend="openvino", device="gpu", match="device='gpu'")
    _raises(BackendError, Classifier, models["fp32"], backend="tensorrt", match="not one")


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (where blocking an import cannot leak into other tests)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)


def test_backend_not_installed_says_what_to_pip_install(models, tmp_path):
    # sys.modules[name] = None makes `import name` fail as if the package were absent.
    proc = _run_isolated(f"""
        import sys
        sys.modules["openvino"] = None
        sys.modules["tensorrt"] = None
        sys.modules["tensorrt_rtx_bindings"] = None
        from tledge_runtime import Classifier
        from tledge_runtime.errors import BackendError
        from tledge_runtime.backends.nvidia import import_tensorrt
        try:
            Classifier({str(models["fp32"])!r}, backend="openvino")
        except BackendError as e:
            print("openvino:", e.message, "|", e.hint)
        try:
            import_tensorrt()
        except BackendError as e:
            print("tensorrt:", e.message, "|", e.hint)
        sys.modules["onnxruntime"] = None
        try:
            Classifier({str(models["fp32"])!r})
        except BackendError as e:
            print("onnxruntime:", e.message, "|", e.hint)
    """)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert "pip install openvino" in lines["openvino"]
    assert "not installed" in lines["tensorrt"] and "pip install tensorrt" in lines["tensorrt"]
    assert "pip install onnxruntime" in lines["onnxruntime"]


def test_cuda_python_missing_is_a_backend_error(tmp_path):
    proc = _run_isolated("""
        import sys
        sys.modules["cuda"] = None
        sys.modules["cuda.bindings"] = None
        from tledge_runtime.errors import BackendError
        from tledge_runtime.backends.trt import import_cudart
        from tledge_runtime.backends.loader import cuda_device_count
        print("count:", cuda_device_count())
        try:
            import_cudart()
        except BackendError as e:
            print("cudart:", e.message, "|", e.hint)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "count: None" in proc.stdout
    assert "pip install cuda-python" in proc.stdout
