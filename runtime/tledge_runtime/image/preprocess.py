"""Image -> model input: the one implementation, used by training, evaluation, export, benchmark and the device.

The steps, driven by the model's :class:`~tledge_runtime.model.meta.Preprocess`:

1. open and check the image (:mod:`tledge_runtime.image.decode`): file, bytes, PIL image or camera frame;
2. plan the geometry in the *displayed* picture (EXIF orientation applied): ``resize="crop"`` scales
   the shorter side to ``resize_size`` (the longer side truncated, as torchvision does) and takes the
   centre ``height x width``; ``resize="stretch"`` resizes the whole picture to ``height x width``;
3. resample only the region that plan keeps, straight to model size, with Pillow's ``resize(box=...,
   reducing_gap=2)``: an integer box reduction first when the picture is more than twice the model
   size, then the model's interpolation. No full-size resized picture, crop copy or colour-swapped
   frame is ever made. JPEG files are decoded at 1/2, 1/4 or 1/8 scale when that still leaves the
   reducing gap (libjpeg's DCT scaling);
4. orientation, grey -> RGB and BGR -> RGB on the model-size result (exact: resampling works per
   channel and commutes with these permutations);
5. normalize: ``(x * scale - mean) / std`` per channel (:class:`Normalizer`; the factors come from
   :func:`normalize_factors`, which the baked graph and the training loop use too).

Training decodes its images with these same functions, so the tensor a device feeds its model is the
tensor the model was trained and verified on, by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from tledge_runtime.image.budgets import DEFAULT_LIMITS, ImageLimits
from tledge_runtime.image.decode import TRANSPOSE, ImageInput, Opened, decoded, open_image
from tledge_runtime.model.meta import Preprocess

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# Reduce by an integer factor first while the picture stays at least this many times the model size
# (Pillow's `reducing_gap`). 2 is the measured knee: on a 1080p frame it makes a bicubic resize
# ~6x cheaper than a full-size resample, and differs from one by at most a few grey levels
# (benchmarks/preprocess_speed.py prints both).
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class Plan:
    """Where the model input comes from: ``box`` (left, top, right, bottom) in the displayed picture,
    resampled to ``size`` (width, height)."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]


def plan(width: int, height: int, p: Preprocess) -> Plan:
    """The region of a ``width x height`` picture that ``p`` turns into the model input."""
    if p.resize == "stretch":
        return Plan((p.width, p.height), (0.0, 0.0, float(width), float(height)))
    size = p.resize_size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    # Centre crop of the (never materialised) resized picture, offsets rounded like torchvision's CenterCrop,
    # mapped back to source coordinates: the same output pixels as resize-then-crop.
    top = int(round((new_h - p.height) / 2.0))
    left = int(round((new_w - p.width) / 2.0))
    sx, sy = width / new_w, height / new_h
    return Plan((p.width, p.height), (left * sx, top * sy, (left + p.width) * sx, (top + p.height) * sy))


def _stored(plan_: Plan, stored_size: tuple[int, int], orientation: int) -> Plan:
    """``plan_`` (displayed coordinates) in the stored picture's coordinates, for EXIF ``orientation``."""
    ws, hs = stored_size
    l, t, r, b = plan_.box
    w, h = plan_.size
    boxes = {1: (l, t, r, b), 2: (ws - r, t, ws - l, b), 3: (ws - r, hs - b, ws - l, hs - t), 4: (l, hs - b, r, hs - t),
             5: (t, l, b, r), 6: (t, hs - r, b, hs - l), 7: (ws - b, hs - r, ws - t, hs - l), 8: (ws - b, l, ws - t, r)}
    return Plan((h, w) if orientation >= 5 else (w, h), boxes[orientation])


def _draft_request(stored: Plan, stored_size: tuple[int, int]) -> tuple[int, int]:
    """The smallest stored size that keeps ``stored.box`` at least :data:`REDUCING_GAP` times the output."""
    ws, hs = stored_size
    l, t, r, b = stored.box
    w, h = stored.size
    need_x = min(1.0, w * REDUCING_GAP / max(r - l, 1e-9))
    need_y = min(1.0, h * REDUCING_GAP / max(b - t, 1e-9))
    return max(1, math.ceil(ws * need_x)), max(1, math.ceil(hs * need_y))


def _draft_scale(stored_size: tuple[int, int], request: tuple[int, int]) -> int:
    """The 1/s scale libjpeg's draft mode picks for ``request`` (Pillow's rule: the largest s in 8, 4, 2, 1
    with ``size // request >= s``)."""
    scale = min(stored_size[0] // request[0], stored_size[1] // request[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s or s == 1)


def _resample(picture: Image.Image, stored: Plan, scale: int, p: Preprocess, orientation: int) -> np.ndarray:
    """Resample the planned region of a decoded ``L``/``RGB`` picture to model size; upright, HxWx3 uint8."""
    box = tuple(v / scale for v in stored.box) if scale != 1 else stored.box
    small = picture.resize(stored.size, _RESAMPLE[p.interpolation], box=box, reducing_gap=REDUCING_GAP)
    if orientation != 1:
        small = small.transpose(TRANSPOSE[orientation])
    a = np.asarray(small)
    return np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a


def prepare_views(source: ImageInput, ps: Sequence[Preprocess], *, channel_order: str = "rgb",
                  limits: ImageLimits = DEFAULT_LIMITS,
                  inspect: Optional[Callable[[Image.Image], None]] = None) -> list[np.ndarray]:
    """``source`` at several geometries (``HxWx3`` uint8 RGB each), decoding it as few times as possible.

    Each view is exactly what :func:`prepare_image` makes for its geometry. A JPEG decoded at a reduced
    scale for one geometry is decoded again for a geometry that needs another scale. ``inspect`` sees
    each decoded picture before it is resized (``tledge-runtime check`` fingerprints it).
    """
    opened = open_image(source, channel_order=channel_order, limits=limits)
    try:
        return _views(opened, ps, limits, inspect)
    finally:
        opened.close()


def _views(opened: Opened, ps: Sequence[Preprocess], limits: ImageLimits,
           inspect: Optional[Callable[[Image.Image], None]]) -> list[np.ndarray]:
    for p in ps:
        limits.check_pixels(p.width, p.height, opened.name, "model input")
    stored_size = opened.image.size
    plans = [_stored(plan(*opened.size, p), stored_size, opened.orientation) for p in ps]
    can_draft = opened.owned and opened.image.format == "JPEG"
    requests = [_draft_request(s, stored_size) if can_draft else stored_size for s in plans]
    scales = [_draft_scale(stored_size, r) for r in requests]
    out: list[np.ndarray] = [np.empty(0)] * len(ps)
    for i, scale in enumerate(scales):
        if out[i].size:
            continue
        if any(a.size for a in out):
            _reopen(opened)  # a JPEG needs another draft scale (draft mode can be set once per open)
        request = min((r for r, s in zip(requests, scales) if s == scale), key=lambda r: r[0] * r[1])
        with decoded(opened, draft=request if can_draft else None, limits=limits) as picture:
            if inspect is not None:
                inspect(picture)
            drafted = stored_size[0] / picture.size[0] if can_draft else 1
            for j, (s, stored) in enumerate(zip(scales, plans)):
                if s == scale:
                    out[j] = _resample(picture, stored, int(round(drafted)), ps[j], opened.orientation)
    if opened.swap_rb:  # BGR frame: swap red and blue on the model-size result, not on the frame
        out = [np.ascontiguousarray(a[:, :, ::-1]) for a in out]
    return out


def _reopen(opened: Opened) -> None:
    opened.image.close()
    if opened.file is None:
        raise RuntimeError("only images opened from a file or bytes are re-opened")
    opened.file.seek(0)
    opened.image = Image.open(opened.file)


def prepare_image(source: ImageInput, p: Preprocess, *, channel_order: str = "rgb",
                  limits: ImageLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Open, decode, orient, convert and resize/crop one image: an ``HxWx3`` uint8 RGB array at model size."""
    return prepare_views(source, (p,), channel_order=channel_order, limits=limits)[0]


def normalize_factors(p: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(mul, add)`` with ``x * mul + add == (x * scale - mean) / std``.

    Computed in float64, then rounded once: the runtime, the training loop (in torch) and the graph
    of a model with preprocessing baked in all use these exact factors.
    """
    std = np.asarray(p.std, dtype=np.float64)
    mul = (p.scale / std).astype(np.float32)
    add = (-np.asarray(p.mean, dtype=np.float64) / std).astype(np.float32)
    return mul, add


class Normalizer:
    """uint8 NHWC batch -> normalized float NCHW batch, with the per-channel factors precomputed."""

    def __init__(self, p: Preprocess, dtype: type = np.float32):
        mul, add = normalize_factors(p)
        self._mul = mul.reshape(1, 3, 1, 1)
        self._add = add.reshape(1, 3, 1, 1)
        self._dtype = dtype

    def __call__(self, batch_hwc: np.ndarray) -> np.ndarray:
        x = batch_hwc.transpose(0, 3, 1, 2).astype(np.float32)
        x *= self._mul
        x += self._add
        return x if self._dtype is np.float32 else x.astype(self._dtype)


def preprocess(source: ImageInput, p: Preprocess, *, channel_order: str = "rgb") -> np.ndarray:
    """One image as a normalized ``1x3xHxW`` float32 tensor (the input of a model without baked preprocessing)."""
    return Normalizer(p)(prepare_image(source, p, channel_order=channel_order)[None])
