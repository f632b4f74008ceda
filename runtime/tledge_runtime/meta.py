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
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NoReturn

from .errors import MetadataError
from .text import unsafe_chars

SCHEMA_VERSION = 1
ONNX_KEY = "tledge"  # metadata_props key that holds the JSON document
# A model file is untrusted input: every size it controls is bounded before anything is allocated from it.
MAX_METADATA_BYTES = 1 << 20  # a real document is a few KB (ImageNet-21k's 21,841 labels fit in 1 MiB)
MAX_JSON_DEPTH = 16  # a real document nests 4 levels; checked on the text, before json.loads can recurse
MAX_SIDE = 2048  # model input height/width, pixels (a 2048x2048 float32 tensor is 50 MB)
MAX_RESIZE_SIDE = 4096  # shorter side of the resize before the centre crop (height / crop_ratio), pixels
MAX_LABELS = 100_000  # classes; the output row and every label are held per prediction
MAX_LABEL_CHARS = 256
MAX_NAME_CHARS = 1024  # tensor names, architecture, versions, dates, quantization node names
MAX_NAMES = 100_000  # quantization.float_nodes entries
MAX_VERIFICATION_DEPTH = 6  # levels inside ``verification`` (the parity report nests 3)
MAX_VERIFICATION_VALUES = 10_000  # numbers, strings, lists and objects inside ``verification``
MAX_VERIFICATION_CHARS = 4096  # one string (or key) inside ``verification``
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
            _check(isinstance(values, (list, tuple)) and all(_is_number(v) for v in values),
                   f"preprocess {name} must be a list of numbers")
        _check(_is_number(self.scale) and 0 < self.scale <= 1,
               "preprocess scale must be a number in (0, 1] (1/255 for 0..1 inputs, 1 for 0..255)")
        _check(_is_number(self.crop_ratio), "preprocess crop_ratio must be a number")
        _check(all(_is_str(getattr(self, n), 16) for n in ("resize", "interpolation", "channel_order")),
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
        _check(_is_int(self.height) and _is_int(self.width), "preprocess height/width must be integers")
        _check(8 <= self.height <= MAX_SIDE and 8 <= self.width <= MAX_SIDE,
               f"input size {self.height}x{self.width} is out of range 8..{MAX_SIDE}")
        _check(self.resize in RESIZE_MODES, f"unknown resize policy {self.resize!r}; expected one of {RESIZE_MODES}")
        _check(self.resize != "crop" or self.height == self.width, "resize='crop' needs a square input (height == width)")
        _check(0.1 <= self.crop_ratio <= 1.0, f"crop_ratio {self.crop_ratio} must be in 0.1..1.0")
        # height / crop_ratio is the resize target: 8192 / 0.1 would ask every image for an 81,920-pixel side.
        _check(self.resize != "crop" or self.resize_size <= MAX_RESIZE_SIDE,
               f"crop_ratio {self.crop_ratio} with input {self.height} resizes the shorter side to {self.resize_size} "
               f"pixels, more than {MAX_RESIZE_SIDE}")
        _check(self.interpolation in INTERPOLATIONS, f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")
        _check(self.channel_order == "RGB", "models are trained on RGB input; channel_order must be 'RGB'")
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (R, G, B)")
        # Bounds that keep (value * scale - mean) / std finite in float16/float32 for any 0..255 pixel.
        _check(all(1e-4 <= s <= 1e4 for s in self.std), "std values must be in 1e-4..1e4")
        _check(all(abs(m) <= 1e4 for m in self.mean), "mean values must be in -1e4..1e4")

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
        _check_name(self.name, "input name")
        _check(_is_str(self.layout, 16) and self.layout in LAYOUTS, f"unknown input layout {_short(self.layout)}")
        _check(_is_str(self.dtype, 16) and self.dtype in INPUT_DTYPES, f"unknown input dtype {_short(self.dtype)}")
        _check(self.batch is None or (_is_int(self.batch) and 1 <= self.batch <= MAX_BATCH),
               f"input batch must be null or in 1..{MAX_BATCH}")
        _check(isinstance(self.baked_preprocess, bool), "input baked_preprocess must be true or false")
        _check(not self.baked_preprocess or (self.dtype == "uint8" and self.layout == "NHWC"),
               "baked preprocessing implies a uint8 NHWC input")


@dataclass(frozen=True)
class OutputSpec:
    name: str = "logits"
    kind: str = "logits"  # "logits": softmax is applied by the runtime for scores

    def __post_init__(self) -> None:
        _check_name(self.name, "output name")
        _check(_is_str(self.kind, 16) and self.kind in OUTPUT_KINDS, f"unknown output kind {_short(self.kind)}")


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
            _check_name(getattr(self, name), f"quantization {name}")
        _check(_is_int(self.calibration_images) and 0 <= self.calibration_images <= 10**9,
               "quantization calibration_images must be an integer in 0..1e9")
        _check(isinstance(self.per_channel, bool), "quantization per_channel must be true or false")
        _check(isinstance(self.float_nodes, (list, tuple)) and len(self.float_nodes) <= MAX_NAMES,
               f"quantization float_nodes must be a list of at most {MAX_NAMES} names")
        for node in self.float_nodes:
            _check_name(node, "quantization float_nodes entry")
        object.__setattr__(self, "float_nodes", tuple(self.float_nodes))


@dataclass(frozen=True)
class Provenance:
    architecture: str
    checkpoint_sha256: str = ""
    tledge_version: str = ""
    opset: int | None = None
    created: str = ""  # ISO 8601, UTC

    def __post_init__(self) -> None:
        _check_name(self.architecture, "provenance architecture")
        for name in ("checkpoint_sha256", "tledge_version", "created"):
            _check_name(getattr(self, name), f"provenance {name}", empty_ok=True)
        _check(self.opset is None or (_is_int(self.opset) and 1 <= self.opset <= 1000),
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
    verification: dict[str, Any] | None = None  # parity report measured at export time
    task: str = "classification"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check(isinstance(self.labels, (list, tuple)) and all(isinstance(x, str) for x in self.labels),
               "labels must be a list of strings")
        object.__setattr__(self, "labels", tuple(self.labels))
        _check(_is_str(self.task, 64) and self.task == "classification", f"unsupported task {_short(self.task)}")
        _check(len(self.labels) >= 2, "a classifier needs at least 2 labels")
        _check(len(self.labels) <= MAX_LABELS, f"{len(self.labels)} labels, more than the {MAX_LABELS} allowed")
        for i, label in enumerate(self.labels):
            _check_label(i, label)
        _check(len(set(self.labels)) == len(self.labels), "labels must be unique")
        _check(_is_str(self.precision, 16) and self.precision in PRECISIONS, f"unknown precision {_short(self.precision)}")
        for name, cls in (("preprocess", Preprocess), ("provenance", Provenance), ("input", InputSpec),
                          ("output", OutputSpec)):
            _check(isinstance(getattr(self, name), cls), f"metadata field {name!r} must be an object")
        _check(self.quantization is None or isinstance(self.quantization, Quantization),
               "metadata field 'quantization' must be an object or null")
        if self.verification is not None:
            _check_verification(self.verification)

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
            return _build(cls, body, "model")
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
            d = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError) as e:
            raise MetadataError(f"model metadata is not valid JSON ({e})", hint="re-export the model with `tledge export`") from None
        return cls.from_dict(d)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # brackets inside strings do not nest
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str, stop_after: int | None = None) -> int:
    """How deep the arrays/objects of a JSON text nest (0 for a scalar), without parsing it.

    Linear in the text and never recursive, so it is safe on any input; counting stops
    once ``stop_after`` is exceeded. Malformed text gives some number: json.loads refuses it next.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = deepest = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_after is not None and deepest > stop_after:
                    break
        else:
            depth -= 1
    return deepest


def _not_json(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a float")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any, max_chars: int) -> bool:
    return isinstance(v, str) and len(v) <= max_chars


def _short(v: Any) -> str:
    """A value for an error message, cut short: the value came from an untrusted file."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_name(v: Any, what: str, *, empty_ok: bool = False) -> None:
    _check(isinstance(v, str) and (empty_ok or v) and len(v) <= MAX_NAME_CHARS,
           f"{what} must be a {'' if empty_ok else 'non-empty '}string of at most {MAX_NAME_CHARS} characters")
    bad = unsafe_chars(v)
    _check(not bad, f"{what} {_short(v)} holds control characters ({', '.join(bad)})")


def _check_label(i: int, label: str) -> None:
    _check(0 < len(label) <= MAX_LABEL_CHARS, f"label {i} must have 1..{MAX_LABEL_CHARS} characters, "
                                              f"it has {len(label)}")
    # A label is printed by every CLI and server: an escape sequence in it would drive the reader's terminal.
    bad = unsafe_chars(label)
    _check(not bad, f"label {i} {_short(label)} holds control characters ({', '.join(bad)})")


def _check_verification(v: Any) -> None:
    """``verification`` is plain JSON (the parity report); bound its shape so nothing printing it can blow up."""
    _check(isinstance(v, dict), "metadata field 'verification' must be an object")
    budget = [MAX_VERIFICATION_VALUES]
    stack = [(v, 1)]
    while stack:  # iterative: a deep tree built in Python (not parsed) must not recurse either
        node, depth = stack.pop()
        budget[0] -= 1
        _check(budget[0] >= 0, f"verification holds more than {MAX_VERIFICATION_VALUES} values")
        if isinstance(node, dict):
            _check(depth <= MAX_VERIFICATION_DEPTH, f"verification nests more than {MAX_VERIFICATION_DEPTH} levels")
            for key, value in node.items():
                _check(isinstance(key, str) and len(key) <= MAX_VERIFICATION_CHARS,
                       f"verification keys must be strings of at most {MAX_VERIFICATION_CHARS} characters")
                stack.append((value, depth + 1))
        elif isinstance(node, (list, tuple)):
            _check(depth <= MAX_VERIFICATION_DEPTH, f"verification nests more than {MAX_VERIFICATION_DEPTH} levels")
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, str):
            _check(len(node) <= MAX_VERIFICATION_CHARS,
                   f"verification strings must have at most {MAX_VERIFICATION_CHARS} characters")
        else:
            _check(node is None or isinstance(node, bool) or _is_number(node),
                   "verification values must be JSON numbers, strings, true/false/null, lists or objects")


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
        raise MetadataError(f"unknown {what} metadata field(s) {_short(unknown)}",
                            hint="this model was written by a newer tledge; upgrade tledge-runtime")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise MetadataError(f"malformed {what} metadata: {str(e)[:200]}",
                            hint="re-export the model with `tledge export`") from None
