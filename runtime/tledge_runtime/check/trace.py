"""Fingerprinting reference inputs with this machine's preprocessing: at export (to record them) and on the
device (to compare), by the same functions as every prediction (:mod:`tledge_runtime.image.preprocess`)."""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tledge_runtime.image.decode import load_image
from tledge_runtime.image.preprocess import Normalizer, prepare_views
from tledge_runtime.model.meta import Preprocess
from tledge_runtime.model.reference_set import Fingerprint, ReferenceItem, synthetic_image


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Trace:
    """What this machine's code makes of one reference input, stage by stage."""

    fingerprint: Fingerprint
    tensor_u8: np.ndarray  # model-size picture (the input of a baked model)
    tensor: np.ndarray  # normalized 1x3xHxW float32 (the input of the others)


def trace(item_or_source: Any, p: Preprocess) -> Trace:
    """Run this machine's preprocessing on a reference input (an item, encoded bytes, or an array) and
    fingerprint every stage."""
    if isinstance(item_or_source, ReferenceItem):
        source = synthetic_image(item_or_source.seed, p.height, p.width) if item_or_source.synthetic \
            else item_or_source.encoded()
    else:
        source = item_or_source
    seen: list[np.ndarray] = []
    resized = prepare_views(source, (p,), inspect=lambda picture: seen.append(np.asarray(picture)))[0]
    decoded = seen[0]
    means = decoded.reshape(-1, decoded.shape[2] if decoded.ndim == 3 else 1).mean(axis=0)
    tensor = Normalizer(p)(resized[None])
    fp = Fingerprint(_sha(decoded) + f":{decoded.shape}".replace(" ", ""), _sha(resized), _sha(tensor),
                     tuple(round(float(m), 3) for m in means))
    return Trace(fp, resized, tensor)


def encode_reference_image(source: Any, p: Preprocess, quality: int) -> bytes:
    """A held-out image as the reference set stores it: upright, its shorter side a quarter larger than the
    model input (so the device's resize runs), grey when it is grey, JPEG at ``quality``."""
    img = load_image(source)
    w, h = img.size
    side = math.ceil(1.25 * max(p.height, p.width))
    if min(w, h) > side:
        scale = side / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    a = np.asarray(img)
    if (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all():
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
