"""What decoding one image, and all images of the process at once, may cost: checked before any pixel is
allocated. An image is untrusted input; these budgets are how :mod:`tledge_runtime.image.decode` bounds it.

- the pixel count a file's header declares (:attr:`ImageLimits.max_pixels`);
- the bytes one decode needs, mode conversions included (:attr:`ImageLimits.max_bytes`, :func:`estimate_bytes`);
- the bytes all decodes of the process hold at once (:data:`DECODE_MEMORY`): concurrent requests
  of a server wait for memory instead of adding up to gigabytes.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from tledge_runtime.errors import ImageError

_MB = 1 << 20
_HINT_LIMITS = "downscale the image, or raise TLEDGE_MAX_PIXELS / TLEDGE_MAX_IMAGE_MB if it is trusted"

# Bytes per pixel Pillow holds in memory for each mode (RGB is stored as 4 bytes per pixel).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost.

    ``max_pixels``: the decoded picture (Pillow's own bomb limit by default, ~89.5 MP).
    ``max_bytes``: memory one decode may hold, mode conversions included (256 MiB: a 64 MP RGB photo;
    JPEG files are decoded at a reduced scale when the model input is small, so they cost far less).
    """

    max_pixels: int = int(os.environ.get("TLEDGE_MAX_PIXELS", "89478485"))
    max_bytes: int = int(float(os.environ.get("TLEDGE_MAX_IMAGE_MB", "256")) * _MB)

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ImageError(f"image limit {name} must be a positive integer, got {value!r}",
                                 hint="leave it out for the default", kind="bad_array")

    def check_pixels(self, width: int, height: int, name: str, what: str = "image") -> None:
        if width * height > self.max_pixels:
            raise ImageError(f"{name}: {what} of {width}x{height} = {width * height:,} pixels is more than the "
                             f"{self.max_pixels:,} allowed", hint=_HINT_LIMITS, kind="too_large")


DEFAULT_LIMITS = ImageLimits()


class DecodeMemory:
    """A process-wide budget of bytes that decodes in progress may hold.

    Each decode reserves its estimated bytes before anything is allocated and returns them when its
    picture is freed. A decode that would never fit is refused at once; one that fits later waits
    (up to ``timeout_s``), so a burst of large uploads queues instead of exhausting memory.
    """

    def __init__(self, capacity: int, timeout_s: float = 30.0):
        self.capacity, self.timeout_s = int(capacity), timeout_s
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, name: str) -> Iterator[None]:
        if nbytes > self.capacity:
            raise ImageError(f"{name}: decoding needs {nbytes / _MB:.0f} MiB, more than the {self.capacity / _MB:.0f} MiB "
                             "this process allows for decoding", hint="downscale the image, or raise "
                             "TLEDGE_DECODE_MEMORY_MB if it is trusted", kind="too_large")
        with self._cond:
            if not self._cond.wait_for(lambda: self.in_use + nbytes <= self.capacity, timeout=self.timeout_s):
                raise ImageError(f"{name}: waited {self.timeout_s:g} s for {nbytes / _MB:.0f} MiB of decode memory "
                                 "held by other images", hint="retry when the load is lower", kind="busy")
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


DECODE_MEMORY = DecodeMemory(int(float(os.environ.get("TLEDGE_DECODE_MEMORY_MB", "256")) * _MB))


def estimate_bytes(mode: str, size: tuple[int, int]) -> int:
    """Memory a decode of ``mode`` at ``size`` holds at its peak: the decoded picture plus its conversion."""
    w, h = size
    decoded = _MODE_BYTES.get(mode, 4)
    if mode in ("L", "RGB"):
        converted = 0  # resized as they are
    elif mode in _HIGH_BIT_DEPTH:
        converted = 1  # converted to 8-bit grey in place, row block by row block
    elif mode in _ALPHA_MODES or (mode == "P"):
        converted = 4 + 1  # the RGB picture plus the alpha mask
    else:
        converted = 4  # CMYK, YCbCr, LAB, HSV, 1 -> RGB
    return w * h * (decoded + converted)
