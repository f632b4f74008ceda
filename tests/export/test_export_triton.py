"""--triton: a model repository Triton can load (layout, config.pbtxt, labels, the verified ONNX files)."""

from __future__ import annotations

import re

import pytest
from tledge_export.errors import ExportError
from tledge_export.triton import TritonModel, config_pbtxt
from tledge_runtime.meta import InputSpec, ModelMeta, Preprocess, Provenance


def test_repository_layout_and_config(exported_cli):
    root = exported_cli.out / "triton"
    models = sorted(p.name for p in root.iterdir())
    assert models == ["efficientnet_lite0_fp16", "efficientnet_lite0_fp32", "efficientnet_lite0_int8-trt"]
    for name, source in zip(models, ("model.fp16.onnx", "model.onnx", "model.int8-trt.onnx")):
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


def test_plan_models_run_on_gpu_instances_and_fixed_batches_are_refused():
    meta = ModelMeta(labels=("a", "b"), preprocess=Preprocess(height=16, width=16),
                     provenance=Provenance(architecture="x"))
    config = config_pbtxt(TritonModel("x_fp16-engine", b"plan", meta, "plan"), max_batch=8)
    assert 'platform: "tensorrt_plan"' in config and "kind: KIND_GPU" in config
    assert re.search(r"data_type: TYPE_FP32\s*format: FORMAT_NCHW\s*dims: \[ 3, 16, 16 \]", config)
    fixed = meta.with_(input=InputSpec(batch=4))
    with pytest.raises(ExportError, match="dynamic batch"):
        config_pbtxt(TritonModel("x", b"", fixed, "onnx"), max_batch=8)
