"""Any Pillow picture as 8-bit grey or RGB, the same way in training and on the device: high bit depths scaled
by their range (never clipped), transparency composited onto white."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from tledge_runtime.image.budgets import _ALPHA_MODES, _HIGH_BIT_DEPTH

# Transparent pixels are composited onto white: what an image viewer shows, and
# independent of whatever colour values happen to sit under alpha = 0.
_BACKGROUND = (255, 255, 255)

def to_l_or_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit grey (``L``) or ``RGB``, the same way every time.

    16-bit and 32-bit grey levels are scaled to 0..255 by their range (Pillow's own convert would
    clip them), without float64 copies of the picture. Transparency is composited onto white.
    Grey stays grey: it becomes RGB after the resize, where it costs a model-size copy.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in _HIGH_BIT_DEPTH:
        return grey_to_l(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, _BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


_ROW_BLOCK = 1 << 20  # values per strip when converting high-bit-depth pictures (4 MiB of float32)


def grey_to_l(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey picture as 8-bit grey, by its range, not by clipping.

    Float pictures in 0..1 are scaled by 255; anything above 255 is scaled by 1/257 (0..65535 ->
    0..255 exactly at both ends); the rest is clipped and rounded. Strip by strip: beyond the decoded
    picture, memory holds the 8-bit result and one strip, never a float64 or full-size copy.
    """
    w, h = img.size
    rows = max(1, _ROW_BLOCK // max(w, 1))
    strips = [(top, min(h, top + rows)) for top in range(0, h, rows)]

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, w, bottom)))

    peak = img.getextrema()[1]  # one pass in C, no copy
    if not math.isfinite(peak):  # inf or NaN somewhere: the largest finite value, strip by strip
        peak = 0.0
        for top, bottom in strips:
            a = strip(top, bottom)
            a = a[np.isfinite(a)]
            if a.size:
                peak = max(peak, float(a.max()))
    factor = 255.0 if img.mode == "F" and peak <= 1.0 else (1.0 / 257.0 if peak > 255.0 else 1.0)
    out = np.empty((h, w), dtype=np.uint8)
    buf = np.empty((rows, w), dtype=np.float32)  # one strip of float32, reused
    for top, bottom in strips:
        block = buf[: bottom - top]
        np.multiply(strip(top, bottom), np.float32(factor), out=block, casting="unsafe")
        np.nan_to_num(block, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(block, 0, 255, out=block)
        np.rint(block, out=block)
        out[top:bottom] = block
    return Image.fromarray(out, "L")
