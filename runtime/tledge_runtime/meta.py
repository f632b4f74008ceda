"""The model-artifact contract: one versioned JSON document that makes a model self-describing.

This module is the single source of truth for everything that decides what a
prediction means: labels, input size, resize policy, mean/std, precision. The
trainer writes :class:`Preprocess` into checkpoints, the exporter writes
:class:`ModelMeta` into every model file, and every runtime reads it back with
:func:`ModelMeta.from_json`. Nothing else in tledge keeps a copy of these values.

Where it lives in a file:
- ONNX: ``metadata_props`` entry with key :data:`ONNX_KEY`, value = the JSON text.
- TensorRT engine: a header in front of the serialized engine (see :mod:`tledge_runtime.engine_file`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NoReturn

from .errors import MetadataError

SCHEMA_VERSION = 1
ONNX_KEY = "tledge"  # metadata_props key that holds the JSON document
MAX_METADATA_BYTES = 1 << 20  # a real document is a few KB; refuse anything absurd

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
            _check(isinstance(values, (list, tuple)) and all(_is_number(v) for v in values),
                   f"preprocess {name} must be a list of numbers")
        _check(_is_number(self.scale) and self.scale > 0, "preprocess scale must be a positive number")
        _check(_is_number(self.crop_ratio), "preprocess crop_ratio must be a number")
        # Tuples even when built from JSON lists, so instances stay hashable and frozen.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        self.validate()

    @property
    def resize_size(self) -> int:
        """Shorter-side length before the centre crop (``resize="crop"`` only)."""
        return int(math.floor(self.height / self.crop_ratio + 1e-6))

    def validate(self) -> None:
        _check(isinstance(self.height, int) and isinstance(self.width, int), "preprocess height/width must be integers")
        _check(8 <= self.height <= 8192 and 8 <= self.width <= 8192, f"input size {self.height}x{self.width} is out of range 8..8192")
        _check(self.resize in RESIZE_MODES, f"unknown resize policy {self.resize!r}; expected one of {RESIZE_MODES}")
        _check(self.resize != "crop" or self.height == self.width, "resize='crop' needs a square input (height == width)")
        _check(0.1 <= self.crop_ratio <= 1.0, f"crop_ratio {self.crop_ratio} must be in 0.1..1.0")
        _check(self.interpolation in INTERPOLATIONS, f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")
        _check(self.channel_order == "RGB", "models are trained on RGB input; channel_order must be 'RGB'")
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (R, G, B)")
        _check(all(s > 0 for s in self.std), "std values must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return _build(cls, d, "preprocess")


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
        _check(self.layout in LAYOUTS, f"unknown input layout {self.layout!r}")
        _check(self.dtype in INPUT_DTYPES, f"unknown input dtype {self.dtype!r}")
        _check(self.batch is None or (isinstance(self.batch, int) and self.batch >= 1), "input batch must be null or >= 1")
        _check(not self.baked_preprocess or (self.dtype == "uint8" and self.layout == "NHWC"),
               "baked preprocessing implies a uint8 NHWC input")


@dataclass(frozen=True)
class OutputSpec:
    name: str = "logits"
    kind: str = "logits"  # "logits": softmax is applied by the runtime for scores

    def __post_init__(self) -> None:
        _check(self.kind in OUTPUT_KINDS, f"unknown output kind {self.kind!r}")


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
        object.__setattr__(self, "float_nodes", tuple(self.float_nodes))


@dataclass(frozen=True)
class Provenance:
    architecture: str
    checkpoint_sha256: str = ""
    tledge_version: str = ""
    opset: int | None = None
    created: str = ""  # ISO 8601, UTC


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
    verification: dict[str, Any] | None = None  # parity report measured at export time
    task: str = "classification"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(isinstance(self.labels, (list, tuple)) and all(isinstance(x, str) for x in self.labels),
               "labels must be a list of strings")
        object.__setattr__(self, "labels", tuple(self.labels))
        _check(self.task == "classification", f"unsupported task {self.task!r}")
        _check(len(self.labels) >= 2, "a classifier needs at least 2 labels")
        _check(len(set(self.labels)) == len(self.labels), "labels must be unique")
        _check(self.precision in PRECISIONS, f"unknown precision {self.precision!r}")

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
            body["provenance"] = _build(Provenance, body["provenance"], "provenance")
            body["input"] = _build(InputSpec, body.get("input", {}), "input")
            body["output"] = _build(OutputSpec, body.get("output", {}), "output")
            if body.get("quantization") is not None:
                body["quantization"] = _build(Quantization, body["quantization"], "quantization")
            if body.get("verification") is not None and not isinstance(body["verification"], dict):
                raise MetadataError("metadata field 'verification' must be an object",
                                    hint="re-export the model with `tledge export`")
            return _build(cls, body, "model")
        except KeyError as e:
            raise MetadataError(f"model metadata lacks the field {e.args[0]!r}",
                                hint="re-export the model with `tledge export`") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMeta:
        if len(text) > MAX_METADATA_BYTES:
            raise MetadataError(f"model metadata is {len(text)} bytes, more than the {MAX_METADATA_BYTES} allowed",
                                hint="this file was not written by tledge export; re-export it")
        try:
            # NaN, Infinity and 1e999 parse in Python but are not JSON: metadata holding them could not be
            # written back (found by the long fuzz run).
            d = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError) as e:
            raise MetadataError(f"model metadata is not valid JSON ({e})", hint="re-export the model with `tledge export`") from None
        return cls.from_dict(d)


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise MetadataError(message, hint="fix the value, or re-export the model with `tledge export`")


def _build(cls: type, d: Any, what: str) -> Any:
    """Construct a dataclass from a dict, rejecting unknown keys and wrong types with MetadataError."""
    if not isinstance(d, dict):
        raise MetadataError(f"metadata field {what!r} must be an object", hint="re-export the model with `tledge export`")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - known)
    if unknown:
        raise MetadataError(f"unknown {what} metadata field(s) {unknown}",
                            hint="this model was written by a newer tledge; upgrade tledge-runtime")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise MetadataError(f"malformed {what} metadata: {e}", hint="re-export the model with `tledge export`") from None
