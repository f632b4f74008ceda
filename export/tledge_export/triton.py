"""A Triton Inference Server model repository for the exported models.

Per exported format, the graph, and for ONNX formats also an image model::

    triton/
      <arch>_<format>/
        config.pbtxt      platform, batch limit, dynamic batching, input/output tensors
        labels.txt        one class name per line, in output order (Triton's classification extension)
        1/model.onnx      or 1/model.plan (a raw TensorRT plan: Triton reads no tledge header)
      <arch>_<format>_image/
        config.pbtxt      Python backend: encoded image bytes in; label, score, probabilities out
        labels.txt
        1/model.py        tledge_runtime.serve.triton_python runs the sibling model.onnx (decode + preprocess + infer)

``tritonserver --model-repository <export>/triton`` serves them; a client sends the graph's
input (normalized NCHW float, or uint8 NHWC for baked models) to ``<arch>_<format>``, or JPEG/PNG
bytes to ``<arch>_<format>_image`` (its Python environment needs ``pip install tledge-runtime``).
Names and tensors come from :mod:`tledge_runtime.serve.served_model`, the rule ``tledge-runtime serve``
follows too, so one client works against both servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tledge_export.artifact import refuse_links, write_file
from tledge_export.errors import ExportError
from tledge_runtime.model.meta import ModelMeta
from tledge_runtime.serve import served_model as sm
from tledge_runtime.serve.served_model import model_name

__all__ = ["TritonModel", "config_pbtxt", "image_config_pbtxt", "model_name", "write_repository"]

QUEUE_DELAY_US = 100  # how long the dynamic batcher waits to fill a batch: latency cost per request, at most
PYTHON_MODEL = (
    "# Triton Python-backend model written by `tledge export --triton`. The code is tledge_runtime's:\n"
    "# `pip install tledge-runtime` in the Python environment of Triton's Python backend.\n"
    "from tledge_runtime.serve.triton_python import TritonPythonModel  # noqa: F401\n"
)


@dataclass(frozen=True)
class TritonModel:
    """One model to serve: its name in the repository, its bytes, and the metadata describing them."""

    name: str
    data: bytes
    meta: ModelMeta
    kind: str  # "onnx" | "plan"

    def __post_init__(self) -> None:
        expected = sm.default_name(self.meta, engine=self.kind == "plan")
        if self.name != expected:  # the server and the repository must agree on names: one rule, checked here
            raise ExportError(f"Triton model name {self.name!r} differs from {expected!r}, the name "
                              "tledge-runtime serve gives this file", hint="name it with served_model.default_name")


def config_pbtxt(model: TritonModel, max_batch: int) -> str:
    """The ``config.pbtxt`` of ``model`` (protobuf text format of Triton's ModelConfig)."""
    meta = model.meta
    if meta.input.batch is not None:
        raise ExportError("Triton's dynamic batcher needs a dynamic batch axis, the export has a fixed batch",
                          hint="export with --batch dynamic for --triton")
    platform = "onnxruntime_onnx" if model.kind == "onnx" else "tensorrt_plan"
    layout = f"FORMAT_{meta.input.layout}"
    lines = [f'name: "{model.name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             *_tensors("input", sm.graph_inputs(meta), layout), *_tensors("output", sm.graph_outputs(meta)),
             "dynamic_batching {", f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}", "}"]
    if model.kind == "plan":
        lines += ["instance_group [", "  {", "    kind: KIND_GPU", "    count: 1", "  }", "]"]
    return "\n".join(lines) + "\n"


def image_config_pbtxt(model: TritonModel, max_batch: int) -> str:
    """The ``config.pbtxt`` of ``model``'s image model: Python backend, tledge_runtime on the sibling ONNX file."""
    name = model.name + sm.IMAGE_SUFFIX
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
             *_tensors("input", sm.image_inputs(model.meta)), *_tensors("output", sm.image_outputs(model.meta)),
             "dynamic_batching {", f"  max_queue_delay_microseconds: {QUEUE_DELAY_US}", "}",
             "instance_group [", "  {", "    kind: KIND_CPU", "    count: 1", "  }", "]",
             "parameters: {", '  key: "tledge_model"',
             f'  value: {{ string_value: "../{model.name}/1/model.onnx" }}', "}"]
    return "\n".join(lines) + "\n"


def _tensors(kind: str, specs: Sequence[sm.TensorSpec], layout: str | None = None) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(specs):
        lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.triton_type}"]
        if layout is not None:
            lines.append(f"    format: {layout}")
        lines.append(f"    dims: [ {', '.join(str(d) for d in t.dims)} ]")
        if t.labelled:
            lines.append('    label_filename: "labels.txt"')
        lines.append("  }," if i < len(specs) - 1 else "  }")
    return lines + ["]"]


def write_repository(root: Path, models: Sequence[TritonModel], *, max_batch: int) -> Path:
    """Write the repository for ``models`` under ``root`` (files written atomically); returns ``root``.

    Every sub-path written (``root``, each model and version folder, each file) is checked for links first:
    a link planted in the export folder is refused, never written through."""
    for model in models:
        folder = root / model.name
        config = config_pbtxt(model, max_batch)
        labels = ("\n".join(model.meta.labels) + "\n").encode("utf-8")
        _write(root, folder / "1" / ("model.onnx" if model.kind == "onnx" else "model.plan"), model.data)
        _write(root, folder / "labels.txt", labels)
        _write(root, folder / "config.pbtxt", config.encode("utf-8"))
        if model.kind == "onnx":
            image = root / (model.name + sm.IMAGE_SUFFIX)
            _write(root, image / "1" / "model.py", PYTHON_MODEL.encode("utf-8"))
            _write(root, image / "labels.txt", labels)
            _write(root, image / "config.pbtxt", image_config_pbtxt(model, max_batch).encode("utf-8"))
    return root


def _write(root: Path, path: Path, data: bytes) -> None:
    refuse_links(root, path)
    write_file(path, data)
