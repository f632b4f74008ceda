"""The reference set a model carries, so the device can re-check decode, preprocessing and numerics itself.

``tledge export`` embeds in every model file (ONNX metadata and engine header) a few held-out images,
re-encoded small (JPEG), and for each one:

- fingerprints of the three preprocessing stages as the exporting machine computed them with this same
  code: the decoded picture, the model-size picture after resize/crop, the normalized tensor;
- PyTorch's fp32 logits on that tensor.

Plus synthetic inputs (a seeded pattern at model size, from a generator specified here so every machine
makes the same bytes): they check the numerics alone, and are all a model exported with
``--no-reference-images`` (private data) carries. :mod:`tledge_runtime.check.trace` computes the
fingerprints (at export and on the device, with the same code); ``tledge-runtime check``
(:mod:`tledge_runtime.check.replay`) replays the set on the device.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from tledge_runtime.errors import MetadataError
from tledge_runtime.model.bounds import build, check, is_int

MAX_ITEMS = 64
MAX_IMAGE_BYTES = 256 * 1024  # one encoded reference image
MAX_LOGITS = 100_000


@dataclass(frozen=True)
class Fingerprint:
    """SHA-256 prefixes (16 hex digits) of each preprocessing stage's output, and the decoded picture's
    mean grey level per channel (to say *how much* a differing decoder differs)."""

    decoded: str  # the decoded picture (mode L/RGB, stored orientation), before any resize
    resized: str  # uint8 HxWx3 at model size
    normalized: str  # float32 NCHW
    decoded_mean: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("decoded", "resized", "normalized"):
            value = getattr(self, name)
            check(isinstance(value, str) and len(value) <= 64, f"reference fingerprint {name} must be a short string")
        check(isinstance(self.decoded_mean, (list, tuple)) and len(self.decoded_mean) <= 3
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.decoded_mean),
              "reference fingerprint decoded_mean must hold up to 3 numbers")
        object.__setattr__(self, "decoded_mean", tuple(float(v) for v in self.decoded_mean))


@dataclass(frozen=True)
class ReferenceItem:
    """One reference input: an encoded image (``image``, base64) or a synthetic pattern (``seed``)."""

    logits: tuple[float, ...]  # PyTorch fp32 logits on the exporting machine's tensor
    fingerprint: Fingerprint
    image: str = ""  # base64 of the encoded file; "" for a synthetic input
    seed: Optional[int] = None  # synthetic input: the pattern's seed
    label: Optional[int] = None  # the image's true class, when known
    ood_score: Optional[float] = None  # PyTorch's out-of-distribution score (models that carry one)

    def __post_init__(self) -> None:
        check(isinstance(self.image, str) and len(self.image) <= MAX_IMAGE_BYTES * 4 // 3 + 4,
              f"a reference image must be base64 text of at most {MAX_IMAGE_BYTES} bytes")
        check((self.image == "") != (self.seed is None), "a reference item has an image or a seed, not both")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**32), "reference seed must be a uint32")
        check(self.label is None or (is_int(self.label) and 0 <= self.label < MAX_LOGITS), "reference label out of range")
        check(isinstance(self.logits, (list, tuple)) and 0 < len(self.logits) <= MAX_LOGITS
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in self.logits), "reference logits must be a list of finite numbers")
        object.__setattr__(self, "logits", tuple(float(v) for v in self.logits))
        check(self.ood_score is None or (isinstance(self.ood_score, (int, float)) and not isinstance(self.ood_score,
              bool) and math.isfinite(self.ood_score)), "reference ood_score must be null or a finite number")

    @property
    def synthetic(self) -> bool:
        return self.seed is not None

    def encoded(self) -> bytes:
        try:
            return base64.b64decode(self.image, validate=True)
        except ValueError:
            raise MetadataError("a reference image is not valid base64", hint="re-export the model") from None


@dataclass(frozen=True)
class ReferenceSet:
    items: tuple[ReferenceItem, ...]
    # fp16/int8 models: how far from PyTorch's logits this model may be on these items. Twice what the model
    # itself measured on them with onnxruntime's CPU at export (at least 0.05): another backend may round
    # differently, not twice as badly. None for fp32 models, held to their logits budget.
    tolerance: Optional[float] = None
    # The same for the out-of-distribution score, in its own units (twice the model's largest difference there).
    ood_tolerance: Optional[float] = None

    def __post_init__(self) -> None:
        check(isinstance(self.items, (list, tuple)) and len(self.items) <= MAX_ITEMS,
              f"the reference set holds at most {MAX_ITEMS} items")
        check(self.tolerance is None or (isinstance(self.tolerance, (int, float)) and not isinstance(self.tolerance,
              bool) and math.isfinite(self.tolerance) and 0 <= self.tolerance <= 1e6),
              "reference set tolerance must be null or a number in 0..1e6")
        check(self.ood_tolerance is None or (isinstance(self.ood_tolerance, (int, float)) and not isinstance(
              self.ood_tolerance, bool) and math.isfinite(self.ood_tolerance) and 0 <= self.ood_tolerance <= 1e9),
              "reference set ood_tolerance must be null or a number in 0..1e9")
        object.__setattr__(self, "items", tuple(self.items))

    @property
    def images(self) -> int:
        return sum(not item.synthetic for item in self.items)

    def to_dict(self) -> dict[str, Any]:
        out = []
        for item in self.items:
            f = item.fingerprint
            d: dict[str, Any] = {"logits": [float(f"{v:.7g}") for v in item.logits],
                                 "fingerprint": {"decoded": f.decoded, "resized": f.resized,
                                                 "normalized": f.normalized, "decoded_mean": list(f.decoded_mean)}}
            d.update({k: v for k, v in (("image", item.image), ("seed", item.seed), ("label", item.label),
                                        ("ood_score", item.ood_score)) if v not in ("", None)})
            out.append(d)
        extra = {k: v for k, v in (("tolerance", self.tolerance), ("ood_tolerance", self.ood_tolerance)) if v is not None}
        return {"items": out, **extra}

    @classmethod
    def from_dict(cls, d: Any) -> ReferenceSet:
        check(isinstance(d, dict) and set(d) <= {"items", "tolerance", "ood_tolerance"}
              and isinstance(d.get("items"), list),
              "metadata field 'reference_set' must be an object with a list of items")
        items = []
        for raw in d["items"][:MAX_ITEMS + 1]:
            check(isinstance(raw, dict), "reference set items must be objects")
            raw = dict(raw)
            raw["fingerprint"] = build(Fingerprint, raw.get("fingerprint"), "reference fingerprint")
            items.append(build(ReferenceItem, raw, "reference item"))
        return cls(tuple(items), d.get("tolerance"), d.get("ood_tolerance"))


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    """A model-size ``HxWx3`` uint8 pattern (smooth gradients, stripes and noise) from ``seed``.

    The generator is specified here (a 32-bit xorshift over a counter) rather than taken from numpy's,
    whose streams may change between versions: every machine must make exactly these bytes.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    counter = (np.arange(height * width * 3, dtype=np.uint64) + np.uint64(seed) * np.uint64(2654435761)) \
        & np.uint64(0xFFFFFFFF)
    v = counter ^ (counter << np.uint64(13)) & np.uint64(0xFFFFFFFF)
    v = v ^ (v >> np.uint64(17))
    v = v ^ (v << np.uint64(5)) & np.uint64(0xFFFFFFFF)
    noise = (v & np.uint64(63)).astype(np.float32).reshape(height, width, 3) - 31.5
    phase = (seed % 97) / 97.0
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1),
                     127.5 + 100 * np.sin(2 * np.pi * (x + y) / max(width, 8) * (1 + 3 * phase))], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)
