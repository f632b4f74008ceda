"""Backend discovery and choice; the GPU execution providers where a GPU exists (marked ``gpu``)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime
import pytest

from tledge_runtime import Classifier
from tledge_runtime.backends.loader import BACKENDS, available_backends, cuda_device_count, open_backend
from tledge_runtime.errors import BackendError

PROVIDERS = set(onnxruntime.get_available_providers())
HAVE_GPU = bool(cuda_device_count())
needs_cuda_ep = pytest.mark.skipif(not (HAVE_GPU and "CUDAExecutionProvider" in PROVIDERS),
                                   reason="needs onnxruntime-gpu and an NVIDIA GPU")
needs_trt_ep = pytest.mark.skipif(not (HAVE_GPU and "TensorrtExecutionProvider" in PROVIDERS),
                                  reason="needs onnxruntime-gpu with TensorRT and an NVIDIA GPU")


def test_available_backends_describe_this_machine():
    infos = {b.name: b for b in available_backends()}
    assert set(infos) == set(BACKENDS)
    assert infos["ort-cpu"].available
    assert infos["ort-cuda"].available == (HAVE_GPU and "CUDAExecutionProvider" in PROVIDERS)
    assert infos["openvino"].available == (importlib.util.find_spec("openvino") is not None)
    for info in infos.values():
        assert info.detail
        if not info.available:
            # what is missing: a package to install, a GPU, or a CPU feature (openvino-bf16 on a CPU without bf16)
            assert "install" in info.detail or "GPU" in info.detail or "this CPU has no" in info.detail, info


def test_auto_choice_is_explained(models):
    opened = open_backend(models["fp32"])
    try:
        if not HAVE_GPU or not PROVIDERS & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}:
            assert opened.backend.name == "ort-cpu"
            assert opened.reason.startswith("auto: ")
        assert opened.meta.labels == ("red", "green", "blue")
    finally:
        opened.backend.close()
    cpu = open_backend(models["fp32"], device="cpu")
    assert (cpu.backend.name, cpu.reason) == ("ort-cpu", "requested: CPU")
    cpu.backend.close()


def test_backends_report_the_graph_io(models):
    for variant, dtype, shape in (("fp32", np.float32, (None, 3, 16, 16)), ("fp16", np.float16, (None, 3, 16, 16)),
                                  ("baked", np.uint8, (None, 16, 16, 3)), ("fixed2", np.float32, (2, 3, 16, 16))):
        opened = open_backend(models[variant], device="cpu")
        b = opened.backend
        assert (b.input_dtype, b.input_shape, b.output_shape[1]) == (np.dtype(dtype), shape, 3), variant
        assert b.fixed_batch == shape[0]
        b.close()


@pytest.mark.gpu
@needs_cuda_ep
@pytest.mark.parametrize("variant", ["fp32", "fp16", "baked"])
def test_cuda_execution_provider_agrees_with_cpu(models, images, variant):
    files = [f for fs in images.values() for f in fs]
    with Classifier(models[variant], backend="ort-cuda") as gpu, Classifier(models[variant], device="cpu") as cpu:
        assert gpu.backend_name == "ort-cuda"
        np.testing.assert_allclose(gpu.scores_batch(files), cpu.scores_batch(files), atol=2e-3)


@pytest.mark.gpu
@needs_cuda_ep
def test_auto_and_gpu_device_pick_a_gpu_provider(models):
    for device in ("auto", "gpu"):
        with Classifier(models["fp32"], device=device) as clf:
            assert clf.backend_name in ("ort-tensorrt", "ort-cuda")


@pytest.mark.gpu
@needs_trt_ep
def test_tensorrt_execution_provider_agrees_with_cpu_and_caches_engines(models, images, tmp_path, monkeypatch):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path))
    files = [f for fs in images.values() for f in fs]
    with Classifier(models["fp32"], backend="ort-tensorrt") as trt, Classifier(models["fp32"], device="cpu") as cpu:
        assert trt.backend_name == "ort-tensorrt"
        np.testing.assert_allclose(trt.scores_batch(files), cpu.scores_batch(files), atol=2e-3)
    assert any((tmp_path / "ort-tensorrt").iterdir()), "no TensorRT engine cache written"


@pytest.fixture(scope="module")
def int8_models(models, tmp_path_factory):
    from runtime_testkit import write_int8_model

    d = tmp_path_factory.mktemp("int8")
    return {target: write_int8_model(d / f"int8_{target}.onnx", models["fp32"], target=target)
            for target in ("cpu", "tensorrt")}


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_int8_qdq_models_run_on_the_cpu_and_agree_with_fp32(models, int8_models, images, target):
    files = [f for fs in images.values() for f in fs]
    with Classifier(int8_models[target], device="cpu") as q, Classifier(models["fp32"], device="cpu") as f:
        assert q.meta.precision == "int8" and q.meta.quantization.target == target
        np.testing.assert_allclose(q.scores_batch(files), f.scores_batch(files), atol=0.02)
        assert [p.label for p in q.predict_batch(files)] == [p.label for p in f.predict_batch(files)]


@pytest.mark.gpu
@needs_trt_ep
def test_cpu_flavoured_int8_never_goes_to_tensorrt(int8_models, tmp_path, monkeypatch):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path))
    opened = open_backend(int8_models["cpu"])
    try:
        assert opened.backend.name != "ort-tensorrt" and "TensorRT EP skipped" in opened.reason
    finally:
        opened.backend.close()
    with pytest.raises(BackendError) as e:
        Classifier(int8_models["cpu"], backend="ort-tensorrt")
    assert "TensorRT flavour" in e.value.hint


@pytest.mark.gpu
@needs_trt_ep
def test_tensorrt_flavoured_int8_on_the_tensorrt_ep(int8_models, images, tmp_path, monkeypatch):
    monkeypatch.setenv("TLEDGE_CACHE", str(tmp_path))
    files = [f for fs in images.values() for f in fs]
    with Classifier(int8_models["tensorrt"], backend="ort-tensorrt") as trt, \
            Classifier(int8_models["tensorrt"], device="cpu") as cpu:
        np.testing.assert_allclose(trt.scores_batch(files), cpu.scores_batch(files), atol=0.02)
