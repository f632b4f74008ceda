"""Image -> input tensor, in numpy and Pillow, exactly as the training eval transform does it.

The training side builds its eval transform from the same :class:`~tledge_runtime.meta.Preprocess`
with torchvision (``Resize`` on the shorter side, ``CenterCrop``, ``ToTensor``,
``Normalize``); this module reimplements those steps without torch. torchvision
resizes PIL images with Pillow itself, so the geometry here is bit-identical and
only float rounding differs; ``tests/test_preprocess_parity.py`` proves it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .image import ImageInput, load_image
from .meta import Preprocess

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def resize_crop(img: Image.Image, p: Preprocess) -> Image.Image:
    """Geometry only: the RGB image at model size (``p.width x p.height``)."""
    resample = _RESAMPLE[p.interpolation]
    if p.resize == "stretch":
        return _resize(img, (p.width, p.height), resample)
    # Shorter side to resize_size, longer side truncated like torchvision does: int(size * long / short).
    w, h = img.size
    size = p.resize_size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = _resize(img, (new_w, new_h), resample)
    # Centre crop, offsets rounded like torchvision's CenterCrop.
    top = int(round((new_h - p.height) / 2.0))
    left = int(round((new_w - p.width) / 2.0))
    return img.crop((left, top, left + p.width, top + p.height))


def _resize(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    return img if img.size == size else img.resize(size, resample)


def to_uint8_hwc(source: ImageInput, p: Preprocess, *, channel_order: str = "rgb") -> np.ndarray:
    """Load, convert and resize/crop: an ``HxWx3`` uint8 RGB array at model size."""
    return np.asarray(resize_crop(load_image(source, channel_order=channel_order), p), dtype=np.uint8)


class Normalizer:
    """uint8 NHWC batch -> normalized float NCHW batch, with the per-channel factors precomputed."""

    def __init__(self, p: Preprocess, dtype: type = np.float32):
        std = np.asarray(p.std, dtype=np.float64)
        # (x * scale - mean) / std  ==  x * (scale / std) - mean / std
        self._mul = (p.scale / std).astype(np.float32).reshape(1, 3, 1, 1)
        self._add = (-np.asarray(p.mean, dtype=np.float64) / std).astype(np.float32).reshape(1, 3, 1, 1)
        self._dtype = dtype

    def __call__(self, batch_hwc: np.ndarray) -> np.ndarray:
        x = batch_hwc.transpose(0, 3, 1, 2).astype(np.float32)
        x *= self._mul
        x += self._add
        return x if self._dtype is np.float32 else x.astype(self._dtype)


def preprocess(source: ImageInput, p: Preprocess, *, channel_order: str = "rgb") -> np.ndarray:
    """One image as a normalized ``1x3xHxW`` float32 tensor (the non-baked model input)."""
    return Normalizer(p)(to_uint8_hwc(source, p, channel_order=channel_order)[None])


def stack_uint8(sources: Sequence[ImageInput], p: Preprocess, *, channel_order: str = "rgb") -> np.ndarray:
    """Several images as one ``NxHxWx3`` uint8 batch."""
    return np.stack([to_uint8_hwc(s, p, channel_order=channel_order) for s in sources])
