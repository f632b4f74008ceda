"""TensorRT: every TensorRT-bound ONNX parses and builds (TensorRT for RTX, no GPU needed), and --engine
without a GPU/TensorRT fails that format only, with the reason."""

from __future__ import annotations

import json

import onnx
import pytest

from tledge_runtime.backends.nvidia import find_tensorrt
from tledge_runtime.backends.trt_build import check_onnx
from tledge_runtime.errors import EngineBuildError


def _shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return tuple(dims)


@pytest.mark.tensorrt
@pytest.mark.parametrize("where, name", [("cli", "model.fp16.onnx"), ("cli", "model.int8-trt.onnx"),
                                         ("api", "model.fp16.onnx"), ("api", "model.onnx")])
def test_tensorrt_bound_onnx_parses_and_builds(exported, exported_cli, where, name):
    pytest.importorskip("tensorrt_rtx_bindings")
    folder = exported_cli.out if where == "cli" else exported.out
    model = onnx.load(str(folder / name))
    report = check_onnx(model.SerializeToString(), input_name="input", sample_shape=_shape(model), max_batch=16)
    assert "parsed, built for SM86" in report


@pytest.mark.tensorrt
def test_cpu_int8_flavour_is_what_the_parser_rejects(exported):
    """The int32-bias QDQ graph that the TensorRT flavour avoids: NVIDIA's parser refuses it."""
    pytest.importorskip("tensorrt_rtx_bindings")
    model = onnx.load(str(exported.out / "model.int8.onnx"))
    with pytest.raises(EngineBuildError, match="(?i)int32"):
        check_onnx(model.SerializeToString(), input_name="input", sample_shape=_shape(model))


def test_engine_without_tensorrt_gpu_fails_only_that_format(exported_cli):
    assert exported_cli.exception is None, exported_cli.exception
    assert exported_cli.exit_code == 1
    errors = [line for line in exported_cli.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1  # the summary: what was refused, what was written
    assert "refused fp16-engine (unavailable), int8-trt-engine (unavailable)" in errors[0]
    assert "wrote model.onnx, model.fp16.onnx, model.int8-trt.onnx" in errors[0]
    said = [line for line in exported_cli.output.splitlines() if line.startswith("warning: ")]
    engines = [line for line in said if "-engine not written (unavailable)" in line]
    assert len(engines) == 2  # each engine's reason, once
    trt = find_tensorrt()
    if trt is None:
        assert all("TensorRT is not installed" in line for line in engines)
    else:  # TensorRT for RTX here, no GPU: checked ahead of time, nothing written
        assert all("no CUDA GPU" in line and "a check only" in line for line in engines)
    assert not list(exported_cli.out.glob("*.engine"))
    for name in ("model.onnx", "model.fp16.onnx", "model.int8-trt.onnx"):
        assert (exported_cli.out / name).is_file()
    report = json.loads((exported_cli.out / "report.json").read_text())
    status = {f["format"]: f["status"] for f in report["formats"]}
    assert status == {"fp32": "ok", "fp16": "ok", "int8-trt": "ok", "fp16-engine": "unavailable",
                      "int8-trt-engine": "unavailable"}
    assert not report["ok"]
