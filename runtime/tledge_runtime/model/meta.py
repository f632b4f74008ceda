"""The model-artifact contract: one versioned JSON document that makes a model self-describing.

This module is the single source of truth for everything that decides what a
prediction means: labels, input size, resize policy, mean/std, precision. The
trainer writes :class:`Preprocess` into checkpoints, the exporter writes
:class:`ModelMeta` into every model file, and every runtime reads it back with
:func:`ModelMeta.from_json`. Nothing else in tledge keeps a copy of these values.

Where it lives in a file:
- ONNX: ``metadata_props`` entry with key :data:`ONNX_KEY`, value = the JSON text.
- TensorRT engine: a header in front of the serialized engine (see :mod:`tledge_runtime.backends.engine_file`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tledge_runtime.errors import MetadataError
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.bounds import (  # noqa: F401 - limits, importable from here too
    MAX_LABEL_CHARS,
    MAX_NAME_CHARS,
    build,
    check,
    check_label,
    check_name,
    finite_float,
    is_int,
    is_number,
    is_str,
    json_depth,
    not_json,
    short,
)
from tledge_runtime.model.engine_target import EngineTarget
from tledge_runtime.model.reference_set import ReferenceSet
from tledge_runtime.model.verification import Verification

# 2: typed verification (flips, per-class deltas, McNemar) and the embedded reference set.
# 3: ``answers`` (calibration temperature, operating point) and the paired verification (interval of the
# accuracy change, decided/borderline images, the format's numerical noise). Files of versions 1 and 2 still
# load: their fields are a subset, and a model without ``answers`` answers with the top class of a softmax.
SCHEMA_VERSION = 3
ONNX_KEY = "tledge"  # metadata_props key that holds the JSON document
# A model file is untrusted input: every size it controls is bounded before anything is allocated from it.
MAX_METADATA_BYTES = 1 << 20  # a real document is a few KB (ImageNet-21k's 21,841 labels fit in 1 MiB)
MAX_JSON_DEPTH = 16  # a real document nests 4 levels; checked on the text, before json.loads can recurse
MAX_SIDE = 2048  # model input height/width, pixels (a 2048x2048 float32 tensor is 50 MB)
MAX_RESIZE_SIDE = 4096  # shorter side of the resize before the centre crop (height / crop_ratio), pixels
MAX_LABELS = 100_000  # classes; the output row and every label are held per prediction
MAX_NAMES = 100_000  # quantization.float_nodes entries
MAX_BATCH = 4096

RESIZE_MODES = ("crop", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
PRECISIONS = ("fp32", "fp16", "int8")
LAYOUTS = ("NCHW", "NHWC")
INPUT_DTYPES = ("float32", "float16", "uint8")
OUTPUT_KINDS = ("logits", "probabilities")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model's input tensor (the eval transform).

    ``resize="crop"``: scale the shorter side to ``round_down(size / crop_ratio)``
    (keeping aspect), then take the centre ``height x width``. ``crop_ratio=1.0``
    keeps the whole shorter side; ImageNet recipes use 0.875.
    ``resize="stretch"``: resize straight to ``height x width`` (aspect not kept).
    Pixel values: ``(value * scale - mean) / std`` per channel, RGB order.
    """

    height: int = 224
    width: int = 224
    resize: str = "crop"
    crop_ratio: float = 1.0
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0  # uint8 -> [0, 1]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            check(isinstance(values, (list, tuple)) and all(is_number(v) for v in values),
                   f"preprocess {name} must be a list of numbers")
        check(is_number(self.scale) and 0 < self.scale <= 1,
               "preprocess scale must be a number in (0, 1] (1/255 for 0..1 inputs, 1 for 0..255)")
        check(is_number(self.crop_ratio), "preprocess crop_ratio must be a number")
        check(all(is_str(getattr(self, n), 16) for n in ("resize", "interpolation", "channel_order")),
               "preprocess resize, interpolation and channel_order must be short strings")
        # Tuples even when built from JSON lists, so instances stay hashable and frozen.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        self.validate()

    @property
    def resize_size(self) -> int:
        """Shorter-side length before the centre crop (``resize="crop"`` only)."""
        return int(math.floor(self.height / self.crop_ratio + 1e-6))

    def validate(self) -> None:
        check(is_int(self.height) and is_int(self.width), "preprocess height/width must be integers")
        check(8 <= self.height <= MAX_SIDE and 8 <= self.width <= MAX_SIDE,
               f"input size {self.height}x{self.width} is out of range 8..{MAX_SIDE}")
        check(self.resize in RESIZE_MODES, f"unknown resize policy {self.resize!r}; expected one of {RESIZE_MODES}")
        check(self.resize != "crop" or self.height == self.width, "resize='crop' needs a square input (height == width)")
        check(0.1 <= self.crop_ratio <= 1.0, f"crop_ratio {self.crop_ratio} must be in 0.1..1.0")
        # height / crop_ratio is the resize target: 8192 / 0.1 would ask every image for an 81,920-pixel side.
        check(self.resize != "crop" or self.resize_size <= MAX_RESIZE_SIDE,
               f"crop_ratio {self.crop_ratio} with input {self.height} resizes the shorter side to {self.resize_size} "
               f"pixels, more than {MAX_RESIZE_SIDE}")
        check(self.interpolation in INTERPOLATIONS, f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")
        check(self.channel_order == "RGB", "models are trained on RGB input; channel_order must be 'RGB'")
        check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (R, G, B)")
        # Bounds that keep (value * scale - mean) / std finite in float16/float32 for any 0..255 pixel.
        check(all(1e-4 <= s <= 1e4 for s in self.std), "std values must be in 1e-4..1e4")
        check(all(abs(m) <= 1e4 for m in self.mean), "mean values must be in -1e4..1e4")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return build(cls, d, "preprocess")


@dataclass(frozen=True)
class InputSpec:
    """The graph input: tensor name, layout, dtype and batch.

    ``baked_preprocess=True`` means resize/crop happen outside (the runtime still
    does them) but scaling, mean/std and the NHWC->NCHW transpose are inside the
    graph, whose input is uint8 NHWC at model size: a camera frame goes straight in.
    """

    name: str = "input"
    layout: str = "NCHW"
    dtype: str = "float32"
    batch: int | None = None  # None: dynamic batch axis
    baked_preprocess: bool = False

    def __post_init__(self) -> None:
        check_name(self.name, "input name")
        check(is_str(self.layout, 16) and self.layout in LAYOUTS, f"unknown input layout {short(self.layout)}")
        check(is_str(self.dtype, 16) and self.dtype in INPUT_DTYPES, f"unknown input dtype {short(self.dtype)}")
        check(self.batch is None or (is_int(self.batch) and 1 <= self.batch <= MAX_BATCH),
               f"input batch must be null or in 1..{MAX_BATCH}")
        check(isinstance(self.baked_preprocess, bool), "input baked_preprocess must be true or false")
        check(not self.baked_preprocess or (self.dtype == "uint8" and self.layout == "NHWC"),
               "baked preprocessing implies a uint8 NHWC input")


@dataclass(frozen=True)
class OutputSpec:
    name: str = "logits"
    kind: str = "logits"  # "logits": softmax is applied by the runtime for scores

    def __post_init__(self) -> None:
        check_name(self.name, "output name")
        check(is_str(self.kind, 16) and self.kind in OUTPUT_KINDS, f"unknown output kind {short(self.kind)}")


@dataclass(frozen=True)
class Quantization:
    """How an int8 model was calibrated; recorded so a device user can judge it."""

    target: str  # "cpu" (u8 activations, s8 per-channel weights) or "tensorrt" (symmetric s8)
    method: str  # calibration method: minmax | entropy | percentile
    calibration_images: int
    activation_type: str  # "uint8" | "int8"
    weight_type: str = "int8"
    per_channel: bool = True
    float_nodes: tuple[str, ...] = ()  # nodes kept in float by accuracy-aware quantization

    def __post_init__(self) -> None:
        for name in ("target", "method", "activation_type", "weight_type"):
            check_name(getattr(self, name), f"quantization {name}")
        check(is_int(self.calibration_images) and 0 <= self.calibration_images <= 10**9,
               "quantization calibration_images must be an integer in 0..1e9")
        check(isinstance(self.per_channel, bool), "quantization per_channel must be true or false")
        check(isinstance(self.float_nodes, (list, tuple)) and len(self.float_nodes) <= MAX_NAMES,
               f"quantization float_nodes must be a list of at most {MAX_NAMES} names")
        for node in self.float_nodes:
            check_name(node, "quantization float_nodes entry")
        object.__setattr__(self, "float_nodes", tuple(self.float_nodes))


@dataclass(frozen=True)
class Provenance:
    architecture: str
    checkpoint_sha256: str = ""
    tledge_version: str = ""
    opset: int | None = None
    created: str = ""  # ISO 8601, UTC

    def __post_init__(self) -> None:
        check_name(self.architecture, "provenance architecture")
        for name in ("checkpoint_sha256", "tledge_version", "created"):
            check_name(getattr(self, name), f"provenance {name}", empty_ok=True)
        check(self.opset is None or (is_int(self.opset) and 1 <= self.opset <= 1000),
               "provenance opset must be null or an integer in 1..1000")


@dataclass(frozen=True)
class ModelMeta:
    """Everything a device needs to turn an image into a labelled prediction."""

    labels: tuple[str, ...]
    preprocess: Preprocess
    provenance: Provenance
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    precision: str = "fp32"
    quantization: Quantization | None = None
    verification: Verification | None = None  # parity with PyTorch measured at export time
    reference_set: ReferenceSet | None = None  # inputs + fingerprints + PyTorch logits for `tledge-runtime check`
    engine: EngineTarget | None = None  # TensorRT engine files: the TensorRT, GPU and L4T they were built for
    answers: Answers | None = None  # calibration and decision rule; None: softmax of the logits, top class
    task: str = "classification"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check(isinstance(self.labels, (list, tuple)) and all(isinstance(x, str) for x in self.labels),
               "labels must be a list of strings")
        object.__setattr__(self, "labels", tuple(self.labels))
        check(is_str(self.task, 64) and self.task == "classification", f"unsupported task {short(self.task)}")
        check(len(self.labels) >= 2, "a classifier needs at least 2 labels")
        check(len(self.labels) <= MAX_LABELS, f"{len(self.labels)} labels, more than the {MAX_LABELS} allowed")
        for i, label in enumerate(self.labels):
            check_label(i, label)
        check(len(set(self.labels)) == len(self.labels), "labels must be unique")
        check(is_str(self.precision, 16) and self.precision in PRECISIONS, f"unknown precision {short(self.precision)}")
        for name, cls in (("preprocess", Preprocess), ("provenance", Provenance), ("input", InputSpec),
                          ("output", OutputSpec)):
            check(isinstance(getattr(self, name), cls), f"metadata field {name!r} must be an object")
        check(self.quantization is None or isinstance(self.quantization, Quantization),
              "metadata field 'quantization' must be an object or null")
        check(self.verification is None or isinstance(self.verification, Verification),
              "metadata field 'verification' must be an object or null")
        check(self.reference_set is None or isinstance(self.reference_set, ReferenceSet),
              "metadata field 'reference_set' must be an object or null")
        check(self.engine is None or isinstance(self.engine, EngineTarget), "metadata field 'engine' must be an object")
        check(self.answers is None or isinstance(self.answers, Answers), "metadata field 'answers' must be an object")
        point = self.answers.operating_point if self.answers is not None else None
        check(point is None or (len(self.labels) == 2 and point.label in self.labels),
              "an operating point needs a binary model and one of its labels")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def with_(self, **changes: Any) -> ModelMeta:
        """A copy with some fields replaced (the dataclass is frozen)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["labels"] = list(self.labels)
        if self.quantization is not None:
            d["quantization"]["float_nodes"] = list(self.quantization.float_nodes)
        if self.verification is not None:
            d["verification"] = self.verification.to_dict()
        if self.reference_set is not None:
            d["reference_set"] = self.reference_set.to_dict()
        if self.answers is not None:
            d["answers"] = self.answers.to_dict()
        # Field order in the file: version first so a human reading it sees it.
        return {"schema_version": d.pop("schema_version"), "task": d.pop("task"), **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=None, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: Any) -> ModelMeta:
        if not isinstance(d, dict):
            raise MetadataError("model metadata is not a JSON object", hint="re-export the model with `tledge export`")
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise MetadataError("model metadata has no schema_version", hint="re-export the model with `tledge export`")
        if version > SCHEMA_VERSION:
            raise MetadataError(
                f"model metadata uses schema version {version}, this tledge-runtime reads up to {SCHEMA_VERSION}",
                hint="upgrade tledge-runtime (pip install -U tledge-runtime)",
            )
        if version < 1:
            raise MetadataError(f"invalid metadata schema version {version}", hint="re-export the model with `tledge export`")
        body = dict(d)
        try:
            body["preprocess"] = Preprocess.from_dict(body["preprocess"])
            body["provenance"] = build(Provenance, body["provenance"], "provenance")
            body["input"] = build(InputSpec, body.get("input", {}), "input")
            body["output"] = build(OutputSpec, body.get("output", {}), "output")
            if body.get("quantization") is not None:
                body["quantization"] = build(Quantization, body["quantization"], "quantization")
            if body.get("verification") is not None:
                body["verification"] = Verification.from_dict(body["verification"])
            if body.get("reference_set") is not None:
                body["reference_set"] = ReferenceSet.from_dict(body["reference_set"])
            if body.get("engine") is not None:
                body["engine"] = build(EngineTarget, body["engine"], "engine")
            if body.get("answers") is not None:
                body["answers"] = Answers.from_dict(body["answers"])
            return build(cls, body, "model")
        except KeyError as e:
            raise MetadataError(f"model metadata lacks the field {e.args[0]!r}",
                                hint="re-export the model with `tledge export`") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMeta:
        if len(text) > MAX_METADATA_BYTES:
            raise MetadataError(f"model metadata is {len(text)} bytes, more than the {MAX_METADATA_BYTES} allowed",
                                hint="this file was not written by tledge export; re-export it")
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MetadataError(f"model metadata is not UTF-8 text ({e.reason} at byte {e.start})",
                                    hint="re-export the model with `tledge export`") from None
        # json.loads recurses once per level: 100,000 nested brackets end in RecursionError. Count them first.
        depth = json_depth(text, MAX_JSON_DEPTH)
        if depth > MAX_JSON_DEPTH:
            raise MetadataError(f"model metadata nests more than {MAX_JSON_DEPTH} levels deep",
                                hint="this file was not written by tledge export; re-export it")
        try:
            # NaN, Infinity and 1e999 parse in Python but are not JSON: metadata holding them could not be
            # written back (found by the long fuzz run).
            d = json.loads(text, parse_constant=not_json, parse_float=finite_float)
        except (ValueError, UnicodeDecodeError) as e:
            raise MetadataError(f"model metadata is not valid JSON ({e})", hint="re-export the model with `tledge export`") from None
        return cls.from_dict(d)


