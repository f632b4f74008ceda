"""--triton: a model repository Triton can load (layout, config.pbtxt, labels, the verified ONNX files, image models).

Names and tensors are tledge_runtime.serve.served_model's, so ``tledge-runtime serve`` on any file of the
export answers to the same model name with the same tensors as the repository's config.pbtxt.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tledge_export.errors import ExportError
from tledge_export.triton import TritonModel, config_pbtxt
from tledge_runtime.backends.loader import read_meta
from tledge_runtime.model.meta import InputSpec, ModelMeta, Preprocess, Provenance, Quantization
from tledge_runtime.serve.served_model import default_name, format_name

GRAPHS = ["efficientnet_lite0_fp16", "efficientnet_lite0_fp32", "efficientnet_lite0_int8-trt"]


def test_repository_layout_and_config(exported_cli):
    root = exported_cli.out / "triton"
    models = sorted(p.name for p in root.iterdir())
    assert models == sorted(GRAPHS + [g + "_image" for g in GRAPHS])
    for name, source in zip(GRAPHS, ("model.fp16.onnx", "model.onnx", "model.int8-trt.onnx")):
        folder = root / name
        assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
        assert (folder / "1" / "model.onnx").read_bytes() == (exported_cli.out / source).read_bytes()
        assert (folder / "labels.txt").read_text().splitlines() == ["blue", "green", "red"]
        config = (folder / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config and 'platform: "onnxruntime_onnx"' in config
        assert "max_batch_size: 32" in config
        assert re.search(r"dynamic_batching \{\s*max_queue_delay_microseconds: \d+\s*\}", config)
        # Baked models: uint8 NHWC frames at model size go straight in; logits come out with labels.
        assert re.search(r'name: "input"\s*data_type: TYPE_UINT8\s*format: FORMAT_NHWC\s*dims: \[ 32, 32, 3 \]', config)
        logits = r'name: "logits"\s*data_type: TYPE_FP32\s*dims: \[ 3 \]\s*label_filename: "labels.txt"'
        assert re.search(logits, config)
        assert config.count("{") == config.count("}") and config.count("[") == config.count("]")


def test_image_models_run_the_sibling_onnx_in_the_python_backend(exported_cli):
    root = exported_cli.out / "triton"
    for graph in GRAPHS:
        folder = root / (graph + "_image")
        assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["config.pbtxt", "labels.txt", "model.py"]
        assert "from tledge_runtime.serve.triton_python import TritonPythonModel" in (folder / "1" / "model.py").read_text()
        config = (folder / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and "kind: KIND_CPU" in config
        assert re.search(r'name: "image"\s*data_type: TYPE_STRING\s*dims: \[ 1 \]', config)
        assert re.search(r'name: "probabilities"\s*data_type: TYPE_FP32\s*dims: \[ 3 \]\s*label_filename', config)
        sibling = re.search(r'key: "tledge_model"\s*value: \{ string_value: "([^"]+)" \}', config).group(1)
        assert (folder / sibling).resolve() == (root / graph / "1" / "model.onnx").resolve()


def test_names_follow_the_runtime_rule(exported_cli, exported):
    root = exported_cli.out / "triton"
    for graph in GRAPHS:
        assert default_name(read_meta(root / graph / "1" / "model.onnx")) == graph
    # The CPU int8 flavour (the API export) and engines are named as their results are.
    assert format_name(read_meta(exported.get("int8").path)) == "int8"
    assert format_name(read_meta(exported.get("fp16").path), engine=True) == "fp16-engine"


def _config_tensors(config: str) -> list[tuple[str, str, list[int]]]:
    found = re.findall(r'name: "([^"]+)"\s*data_type: TYPE_(\w+)\s*(?:format: \w+\s*)?dims: \[ ([\d, -]+) \]', config)
    return [(n, "BYTES" if t == "STRING" else t, [-1, *map(int, d.split(","))]) for n, t, d in found]


def test_serve_answers_to_the_repository_names_with_its_tensors(exported_cli):
    """The contract: one client for tledge-runtime serve on a device and for Triton on this repository."""
    from tledge_runtime import Classifier
    from tledge_runtime.serve.config import ServeConfig
    from tledge_runtime.serve.server import Server

    root = exported_cli.out / "triton"
    for graph in GRAPHS:
        with Classifier(root / graph / "1" / "model.onnx", device="cpu") as clf, \
                Server(clf, ServeConfig(port=0)) as srv:
            assert srv.name == graph  # the default --name
            for name in (graph, graph + "_image"):
                with urllib.request.urlopen(f"{srv.url}/v2/models/{name}", timeout=10) as resp:
                    meta = json.loads(resp.read())
                served = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"] + meta["outputs"]]
                assert served == _config_tensors((root / name / "config.pbtxt").read_text()), name


def _meta(**changes) -> ModelMeta:
    meta = ModelMeta(labels=("a", "b"), preprocess=Preprocess(height=16, width=16),
                     provenance=Provenance(architecture="x"))
    return meta.with_(**changes)


def test_plan_models_run_on_gpu_instances_and_fixed_batches_are_refused():
    meta = _meta(precision="fp16")
    config = config_pbtxt(TritonModel("x_fp16-engine", b"plan", meta, "plan"), max_batch=8)
    assert 'platform: "tensorrt_plan"' in config and "kind: KIND_GPU" in config
    assert re.search(r"data_type: TYPE_FP32\s*format: FORMAT_NCHW\s*dims: \[ 3, 16, 16 \]", config)
    fixed = _meta(input=InputSpec(batch=4))
    with pytest.raises(ExportError, match="dynamic batch"):
        config_pbtxt(TritonModel("x_fp32", b"", fixed, "onnx"), max_batch=8)


def test_a_name_other_than_the_runtime_rule_is_refused():
    int8_trt = _meta(precision="int8", quantization=Quantization(target="tensorrt", method="percentile",
                                                                 calibration_images=8, activation_type="int8"))
    assert TritonModel("x_int8-trt-engine", b"", int8_trt, "plan").name == "x_int8-trt-engine"
    with pytest.raises(ExportError, match="x_int8-trt"):
        TritonModel("x_int8", b"", int8_trt, "onnx")
