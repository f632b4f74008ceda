"""A Triton Inference Server model repository for the exported models.

One Triton model per exported format::

    triton/
      <arch>_<format>/
        config.pbtxt      platform, batch limit, dynamic batching, input/output tensors
        labels.txt        one class name per line, in output order (Triton's classification extension)
        1/model.onnx      or 1/model.plan (a raw TensorRT plan: Triton reads no tledge header)

``tritonserver --model-repository <export>/triton`` serves them; a client sends the
graph's input (normalized NCHW float, or uint8 NHWC for baked models) and can ask for
the top-k classes by name through ``labels.txt``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tledge_runtime.meta import ModelMeta

from .artifact import write_file
from .errors import ExportError

_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}
QUEUE_DELAY_US = 100  # how long the dynamic batcher waits to fill a batch: latency cost per request, at most


@dataclass(frozen=True)
class TritonModel:
    """One model to serve: its name in the repository, its bytes, and the metadata describing them."""

    name: str
    data: bytes
    meta: ModelMeta
    kind: str  # "onnx" | "plan"


def model_name(arch: str, fmt: str) -> str:
    """Triton model names: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{arch}_{fmt}")


def config_pbtxt(model: TritonModel, max_batch: int) -> str:
    """The ``config.pbtxt`` of ``model`` (protobuf text format of Triton's ModelConfig)."""
    meta = model.meta
    spec, p = meta.input, meta.preprocess
    if spec.batch is not None:
        raise ExportError("Triton's dynamic batcher needs a dynamic batch axis, the export has a fixed batch",
                          hint="export with --batch dynamic for --triton")
    dims = [p.height, p.width, 3] if spec.layout == "NHWC" else [3, p.height, p.width]
    platform = "onnxruntime_onnx" if model.kind == "onnx" else "tensorrt_plan"
    lines = [
        f'name: "{model.name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: {_TRITON_TYPES[spec.dtype]}",
        f"    format: FORMAT_{spec.layout}",
        f"    dims: [ {', '.join(str(d) for d in dims)} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{meta.output.name}"',
        f"    data_type: {_TRITON_TYPES['float16' if _fp16_output(meta) else 'float32']}",
        f"    dims: [ {meta.num_classes} ]",
        '    label_filename: "labels.txt"',
        "  }",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}",
        "}",
    ]
    if model.kind == "plan":
        lines += ["instance_group [", "  {", "    kind: KIND_GPU", "    count: 1", "  }", "]"]
    return "\n".join(lines) + "\n"


def _fp16_output(meta: ModelMeta) -> bool:
    # fp16 models keep float32 outputs unless exported with fp16 I/O, which the input dtype records.
    return meta.input.dtype == "float16"


def write_repository(root: Path, models: Sequence[TritonModel], *, max_batch: int) -> Path:
    """Write the repository for ``models`` under ``root`` (files written atomically); returns ``root``."""
    for model in models:
        folder = root / model.name
        config = config_pbtxt(model, max_batch)
        write_file(folder / "1" / ("model.onnx" if model.kind == "onnx" else "model.plan"), model.data)
        write_file(folder / "labels.txt", ("\n".join(model.meta.labels) + "\n").encode("utf-8"))
        write_file(folder / "config.pbtxt", config.encode("utf-8"))
    return root
