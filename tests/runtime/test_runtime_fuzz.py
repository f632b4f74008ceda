"""Property-based fuzzing of the runtime's untrusted-input entry points (hypothesis).

Properties: whatever bytes, arrays or metadata arrive, the runtime either returns a valid
result or raises its own error type (ImageError / MetadataError) with a hint: never another
exception, never a hang, never a wrong-shaped tensor. Bounded for CI (well under a minute);
``TLEDGE_FUZZ_EXAMPLES=20000 pytest tests/runtime/test_runtime_fuzz.py`` runs the long campaign.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tledge_runtime.errors import ImageError, MetadataError
from tledge_runtime.image.decode import load_image
from tledge_runtime.image.preprocess import preprocess
from tledge_runtime.model.meta import ModelMeta, Preprocess, Provenance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt files we feed it

EXAMPLES = int(os.environ.get("TLEDGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 150,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seed_files() -> list[bytes]:
    """Valid encodings of small images in the formats and modes decoders must handle."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = []
    for fmt, img in (("PNG", Image.fromarray(rgb)), ("JPEG", Image.fromarray(rgb)), ("GIF", Image.fromarray(rgb).quantize(8)),
                     ("BMP", Image.fromarray(rgb[:, :, 0])), ("TIFF", Image.fromarray(rgb)), ("WEBP", Image.fromarray(rgb)),
                     ("PNG", Image.fromarray(np.dstack([rgb, rgb[:, :, :1]]))),
                     ("PNG", Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257))):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated_files(draw):
    """A valid image file with random byte flips, insertions and truncation: the inputs decoders choke on."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 1:
            del data[i]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def _check_image(img: Image.Image) -> None:
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1


@FUZZ
@given(st.one_of(mutated_files(), st.binary(max_size=512)))
def test_decoding_untrusted_bytes_returns_rgb_or_image_error(data):
    try:
        img = load_image(data)
    except ImageError as e:
        assert e.hint and e.kind
        return
    _check_image(img)


ARRAY_DTYPES = st.sampled_from([np.uint8, np.uint16, np.float32, np.int64, np.bool_])


@FUZZ
@given(st.lists(st.integers(0, 9), min_size=0, max_size=4), ARRAY_DTYPES, st.sampled_from(["rgb", "bgr", "BGR", "xyz"]))
def test_arrays_of_any_shape_and_dtype_are_accepted_or_refused_cleanly(shape, dtype, order):
    a = np.zeros(shape, dtype=dtype)
    try:
        img = load_image(a, channel_order=order)
    except ImageError as e:
        assert e.kind == "bad_array" and e.hint
        return
    _check_image(img)
    assert a.dtype == np.uint8 and a.ndim in (2, 3)


@st.composite
def preprocess_specs(draw):
    resize = draw(st.sampled_from(["crop", "stretch"]))
    h = draw(st.integers(8, 96))
    w = h if resize == "crop" else draw(st.integers(8, 96))
    return Preprocess(height=h, width=w, resize=resize, crop_ratio=draw(st.floats(0.1, 1.0)),
                      interpolation=draw(st.sampled_from(["nearest", "bilinear", "bicubic"])),
                      mean=tuple(draw(st.floats(0, 1)) for _ in range(3)),
                      std=tuple(draw(st.floats(0.01, 2)) for _ in range(3)))


@FUZZ
@given(preprocess_specs(), st.integers(1, 300), st.integers(1, 300), st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]))
def test_preprocessing_any_image_gives_the_model_shape_and_finite_values(p, w, h, mode):
    rng = np.random.default_rng(w * 1000 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    x = preprocess(img, p)
    assert x.shape == (1, 3, p.height, p.width) and x.dtype == np.float32
    assert np.isfinite(x).all()


VALID_META = ModelMeta(labels=("a", "b"), preprocess=Preprocess(), provenance=Provenance("resnet18")).to_dict()
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                        st.text(max_size=8))
JSON = st.recursive(JSON_LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


@st.composite
def mutated_meta(draw):
    """The valid metadata document with one field deleted or replaced by arbitrary JSON, at any depth."""
    doc = json.loads(json.dumps(VALID_META))
    node = doc
    while isinstance(node, dict) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict):
            break
        node = node[key]
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        if draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(JSON)
    return json.dumps(doc)


# Valid metadata but for one verification value; VALUE becomes a float JSON does not have.
NON_FINITE = json.dumps({
    "schema_version": 1, "task": "classification", "labels": ["a", "b"],
    "preprocess": {"height": 224, "width": 224, "resize": "crop", "crop_ratio": 1.0, "interpolation": "bilinear",
                   "channel_order": "RGB", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "provenance": {"architecture": "resnet18", "checkpoint_sha256": "", "tledge_version": "", "opset": None,
                   "created": ""},
    "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "batch": None, "baked_preprocess": False},
    "output": {"name": "logits", "kind": "logits"}, "precision": "fp32", "quantization": None,
    "verification": {"": "VALUE"}}).replace('"VALUE"', "VALUE")


@FUZZ
@given(st.one_of(mutated_meta(), JSON.map(json.dumps), st.text(max_size=64)))
@example(NON_FINITE.replace("VALUE", "Infinity"))  # found by the 20,000-example run: parsed, then unwritable
@example(NON_FINITE.replace("VALUE", "1e999"))
@example(NON_FINITE.replace("VALUE", "NaN"))
def test_metadata_parses_or_is_refused_with_metadata_error(text):
    meta = _parsed_or_refused(text)
    if meta is not None:  # whatever parsed is a usable contract: bounded, round-trips, valid preprocessing
        _check_parsed(meta)
        meta.preprocess.validate()


def _parsed_or_refused(text: str):
    """The metadata ``text`` parses to, or None when it is refused, as it must be, with a MetadataError and a hint."""
    try:
        return ModelMeta.from_json(text)
    except MetadataError as e:
        assert e.hint
        return None


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_seed_file_decodes(seed):
    _check_image(load_image(SEEDS[seed]))


# ------------------------------------------------------------------ hostile metadata structure
# Beyond one mutated field: depth (raw brackets anywhere in the text, deep trees in any field), sizes
# (label counts and lengths, long strings, wide verification trees), ranges (sizes, ratios, batch, opset
# at and beyond their bounds) and types (every field swapped for another JSON type), several at once.

EXTREME_NUMBERS = st.sampled_from([0, 1, 7, 8, 16, 2047, 2048, 2049, 4096, 4097, 8192, 80_000, 2**31, 2**63, -1,
                                   -(2**63), 0.0, 0.09, 0.1, 0.45, 0.5, 1.0, 1.0000001, 1e-4, 1e-300, 1e4, 1e300,
                                   -1e300, 5e-324, True, False])
SIZES = st.sampled_from([0, 1, 2, 255, 256, 257, 1023, 1024, 1025, 4096, 4097, 70_000])
CONTROL = st.sampled_from(["\n", "\t", "\r", "\x00", "\x1b[2J", "\x1b]0;x\x07", "\x7f", "\x9b", "\u2028", "\u202e",
                           "\udcff"])


# Deep and narrow (a chain up to 40 levels) or shallow and wide (up to 25**3 leaves): never both, so the
# document stays small enough to write.
TREE_SHAPES = st.one_of(st.tuples(st.integers(0, 40), st.just(1)), st.tuples(st.integers(0, 3), st.integers(1, 25)))


def _tree(depth: int, width: int, leaf: Any) -> Any:
    """A JSON tree ``depth`` levels deep (lists and objects alternating), ``width`` children per level, built
    without recursion so any depth can be drawn."""
    node = leaf
    for level in range(depth):
        node = [node] * width if level % 2 else {f"k{i}": node for i in range(width)}
    return node


@st.composite
def hostile_values(draw):
    kind = draw(st.sampled_from(["number", "string", "control", "tree", "null", "list", "object"]))
    if kind == "number":
        return draw(EXTREME_NUMBERS)
    if kind == "string":
        return draw(st.sampled_from("ax[{\"\\")) * draw(SIZES)
    if kind == "control":
        return draw(st.text(max_size=4)) + draw(CONTROL) + draw(st.text(max_size=4))
    if kind == "tree":
        return _tree(*draw(TREE_SHAPES), draw(JSON_LEAVES))
    if kind == "list":
        return [draw(EXTREME_NUMBERS)] * draw(SIZES)
    if kind == "object":
        return {"k": draw(JSON_LEAVES)}
    return None


FIELDS = [("labels",), ("preprocess", "height"), ("preprocess", "width"), ("preprocess", "crop_ratio"),
          ("preprocess", "resize"), ("preprocess", "scale"), ("preprocess", "mean"), ("preprocess", "std"),
          ("preprocess", "interpolation"), ("input", "name"), ("input", "batch"), ("input", "layout"),
          ("input", "dtype"), ("input", "baked_preprocess"), ("output", "name"), ("output", "kind"),
          ("provenance", "architecture"), ("provenance", "opset"), ("provenance", "created"),
          ("provenance", "checkpoint_sha256"), ("quantization",), ("verification",), ("precision",), ("task",),
          ("schema_version",), ("preprocess",), ("input",), ("provenance",)]
QUANTIZATION = {"target": "cpu", "method": "minmax", "calibration_images": 8, "activation_type": "uint8",
                "weight_type": "int8", "per_channel": True, "float_nodes": ["Conv_0"]}


@st.composite
def hostile_meta(draw):
    """The valid document (16-px test model) with 1-4 hostile changes, then possibly raw brackets inserted."""
    doc = json.loads(json.dumps(VALID_META))
    doc["preprocess"].update(height=16, width=16, crop_ratio=0.875)
    if draw(st.booleans()):
        doc["quantization"] = dict(QUANTIZATION)
        doc["precision"] = "int8"
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(FIELDS))
        what = draw(st.sampled_from(["value", "labels", "verification", "range"]))
        if what == "labels":
            n, size = draw(st.sampled_from([0, 1, 2, 3, 1000, 100_001])), draw(st.sampled_from([0, 1, 8, 256, 257]))
            labels = [f"{i:0{size}d}"[-size:] if size else "" for i in range(n)]
            if labels and draw(st.booleans()):
                labels[draw(st.integers(0, len(labels) - 1))] = draw(hostile_values())
            doc["labels"] = labels
        elif what == "verification":
            doc["verification"] = _tree(*draw(TREE_SHAPES), draw(st.one_of(JSON_LEAVES, hostile_values())))
        elif what == "range":
            side = draw(st.sampled_from([8, 16, 224, 2048, 2049]))
            doc["preprocess"] = doc["preprocess"] if isinstance(doc.get("preprocess"), dict) else {}
            doc["preprocess"].update(height=side, width=side, crop_ratio=draw(st.floats(0.05, 1.05)))
        else:
            node = doc
            for key in path[:-1]:
                node = node.setdefault(key, {}) if isinstance(node.get(key), dict) else node
            node[path[-1]] = draw(hostile_values())
    text = json.dumps(doc)
    if draw(st.integers(0, 4)) == 0:  # raw brackets at any position: unbalanced, deep, inside strings
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.sampled_from("[{")) * draw(st.sampled_from([1, 16, 17, 1000, 100_000])) + text[i:]
    return text


def _check_parsed(meta: ModelMeta) -> None:
    """What a parsed document guarantees every consumer: bounded sizes, printable labels, a round trip."""
    from tledge_runtime.model.meta import MAX_LABEL_CHARS, MAX_LABELS, MAX_RESIZE_SIDE, MAX_SIDE
    from tledge_runtime.text import unsafe_chars

    p = meta.preprocess
    assert 8 <= p.height <= MAX_SIDE and 8 <= p.width <= MAX_SIDE
    assert p.resize != "crop" or p.resize_size <= MAX_RESIZE_SIDE
    assert 2 <= len(meta.labels) <= MAX_LABELS
    assert all(0 < len(label) <= MAX_LABEL_CHARS and not unsafe_chars(label) for label in meta.labels)
    assert ModelMeta.from_json(meta.to_json()) == meta


@FUZZ
@given(hostile_meta())
def test_hostile_metadata_structure_parses_bounded_or_is_a_metadata_error(text):
    meta = _parsed_or_refused(text)
    if meta is not None:
        _check_parsed(meta)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-models")


@FUZZ
@given(hostile_meta())
def test_hostile_metadata_in_a_real_onnx_file_loads_or_is_refused(fuzz_dir, text):
    """The same documents inside a real ONNX model, through Classifier: load and predict, or a
    MetadataError/ModelError with a hint; nothing else."""
    from runtime_testkit import colour_image, write_model

    from tledge_runtime import Classifier
    from tledge_runtime.errors import ModelError

    path = write_model(fuzz_dir / "model.onnx", meta_json=text)
    try:
        clf = Classifier(path, device="cpu")
    except (MetadataError, ModelError) as e:
        assert e.hint
        return
    with clf:
        _check_parsed(clf.meta)
        prediction = clf.predict(colour_image("red", 0))
        assert prediction.label in clf.labels and 0 <= prediction.score <= 1
