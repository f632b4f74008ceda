"""How a served model looks from outside: its name and its tensors, one rule for tledge's server and for Triton.

``tledge export --triton`` writes a Triton model repository; ``tledge-runtime serve`` answers the
Open Inference Protocol (v2). A client written against one must work against the other, so the
model names and the input/output tensor names, datatypes and shapes come from here, both for the
repository's ``config.pbtxt`` (tledge_export.triton) and for the server's model metadata:

- ``<arch>_<format>``: the graph as exported. Input: the graph's input (normalized float NCHW, or
  uint8 NHWC at model size for baked models); output: the graph's logits (or probabilities).
- ``<arch>_<format>_image``: encoded image files in (one BYTES element per image), the label,
  its score and every class's probability out; decoding and preprocessing run on the server
  (tledge_runtime inside Triton's Python backend, or ``tledge-runtime serve``).

Formats are named as the export names its files: fp32, fp16, int8 (CPU flavour), int8-trt
(TensorRT flavour), and ``<format>-engine`` for TensorRT engines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from tledge_runtime.errors import ImageError
from tledge_runtime.model.meta import ModelMeta

IMAGE_SUFFIX = "_image"
IMAGE_INPUT = "image"
LABEL_OUTPUT = "label"
SCORE_OUTPUT = "score"
PROBABILITIES_OUTPUT = "probabilities"
CANDIDATES_OUTPUT = "candidates"  # the prediction set: labels joined by newlines (models with conformal sets)
UNKNOWN_OUTPUT = "unknown"  # models with an out-of-distribution output
OOD_OUTPUT = "ood_score"

# Open Inference Protocol datatypes of the graph's tensors (Triton's config says TYPE_<datatype>, BYTES is STRING).
_DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor: its name, its protocol datatype, its shape without the batch axis."""

    name: str
    datatype: str  # FP32 | FP16 | UINT8 | BYTES
    dims: tuple[int, ...]
    labelled: bool = False  # one value per class: Triton's classification extension applies (labels.txt)

    @property
    def triton_type(self) -> str:
        """The ``data_type`` of Triton's ``config.pbtxt``."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"

    def metadata(self) -> dict:
        """The tensor as the protocol's model metadata lists it (the batch axis is -1: any size)."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.dims]}


@dataclass(frozen=True)
class Served:
    """One model name the server answers to and its tensors (as the Triton repository has them)."""

    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    image: bool  # encoded images in (decoded here), else the graph's own tensors
    version: str = "1"  # the version serving under this name

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}


def served_models(meta: ModelMeta, name: str, *, engine: bool, version: str = "1") -> dict[str, Served]:
    """The two names a model is served under: ``name`` (the graph's tensors) and ``name_image`` (encoded images)."""
    platform = "tensorrt_plan" if engine else "onnxruntime_onnx"
    return {name: Served(name, platform, graph_inputs(meta), graph_outputs(meta), image=False, version=version),
            name + IMAGE_SUFFIX: Served(name + IMAGE_SUFFIX, "python", image_inputs(meta), image_outputs(meta),
                                        image=True, version=version)}


def model_name(arch: str, fmt: str) -> str:
    """Triton model names: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{arch}_{fmt}")


def format_name(meta: ModelMeta, *, engine: bool = False) -> str:
    """The export's name for the format of a file with metadata ``meta``: fp32, fp16, int8, int8-trt, *-engine."""
    fmt = meta.precision
    if meta.precision == "int8" and meta.quantization is not None and meta.quantization.target == "tensorrt":
        fmt = "int8-trt"
    return f"{fmt}-engine" if engine else fmt


def default_name(meta: ModelMeta, *, engine: bool = False) -> str:
    """The name ``tledge export --triton`` gives this model in the repository."""
    return model_name(meta.provenance.architecture or "model", format_name(meta, engine=engine))


def graph_inputs(meta: ModelMeta) -> tuple[TensorSpec, ...]:
    spec, p = meta.input, meta.preprocess
    dims = (p.height, p.width, 3) if spec.layout == "NHWC" else (3, p.height, p.width)
    return (TensorSpec(spec.name, _DATATYPES[spec.dtype], dims),)


def graph_outputs(meta: ModelMeta) -> tuple[TensorSpec, ...]:
    # fp16 models keep float32 outputs unless exported with fp16 I/O, which the input dtype records.
    datatype = "FP16" if meta.input.dtype == "float16" else "FP32"
    logits = TensorSpec(meta.output.name, datatype, (meta.num_classes,), labelled=True)
    ood = meta.answers.ood if meta.answers is not None else None
    return (logits,) if ood is None else (logits, TensorSpec(ood.output, "FP32", (1,)))


def image_inputs(meta: ModelMeta) -> tuple[TensorSpec, ...]:
    return (TensorSpec(IMAGE_INPUT, "BYTES", (1,)),)


def image_outputs(meta: ModelMeta) -> tuple[TensorSpec, ...]:
    out = (TensorSpec(LABEL_OUTPUT, "BYTES", (1,)), TensorSpec(SCORE_OUTPUT, "FP32", (1,)),
           TensorSpec(PROBABILITIES_OUTPUT, "FP32", (meta.num_classes,), labelled=True))
    a = meta.answers
    if a is not None and a.conformal is not None:
        out += (TensorSpec(CANDIDATES_OUTPUT, "BYTES", (1,)),)
    if a is not None and a.ood is not None:
        out += (TensorSpec(UNKNOWN_OUTPUT, "BOOL", (1,)), TensorSpec(OOD_OUTPUT, "FP32", (1,)))
    return out


def prepare_images(classifier: Any, encoded: np.ndarray) -> np.ndarray:
    """The ``image`` input of an ``_image`` model (N rows of one encoded file each) as ``Classifier.infer`` takes it.

    Errors name the row (``image 3: not an image ...``) so a client sending a batch knows which file failed.
    """
    prepared = []
    for i, row in enumerate(encoded.reshape(len(encoded), -1)):
        if row.size != 1:
            raise ImageError(f"input {IMAGE_INPUT!r}: {row.size} elements in row {i}, one encoded image per row "
                             "expected", hint="send shape [N, 1]", kind="bad_array")
        try:
            prepared.append(classifier.prepare(bytes(row[0])))
        except ImageError as e:  # load_image names in-memory sources "<bytes>"; here they are rows of the input
            raise ImageError(e.message.replace("<bytes>", f"image {i}", 1), e.hint, e.kind) from None
    return np.stack(prepared)


def image_results(probs: np.ndarray, answers: list) -> dict[str, np.ndarray]:
    """The ``_image`` model's outputs for ``N x classes`` probabilities and each row's answer
    (:class:`~tledge_runtime.answers.prediction.Prediction`): label (BYTES), score, probabilities, and the
    prediction set (BYTES, labels joined by newlines), unknown (BOOL) and ood_score where the model has them."""
    label = np.empty((len(probs), 1), dtype=np.object_)
    label[:, 0] = [a.label.encode("utf-8") for a in answers]
    out = {LABEL_OUTPUT: label, SCORE_OUTPUT: np.array([[a.score] for a in answers], dtype=np.float32),
           PROBABILITIES_OUTPUT: probs.astype(np.float32)}
    if answers and answers[0].candidates is not None:
        sets = np.empty((len(answers), 1), dtype=np.object_)
        sets[:, 0] = ["\n".join(a.candidates).encode("utf-8") for a in answers]
        out[CANDIDATES_OUTPUT] = sets
    if answers and answers[0].unknown is not None:
        out[UNKNOWN_OUTPUT] = np.array([[a.unknown] for a in answers], dtype=bool)
        out[OOD_OUTPUT] = np.array([[a.ood_score] for a in answers], dtype=np.float32)
    return out
