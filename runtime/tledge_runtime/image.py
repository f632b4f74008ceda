"""Opening and decoding images the same way everywhere: training, calibration, evaluation and on the device.

Every image that enters tledge is opened by :func:`open_image` and decoded by :func:`decode`, so a
grayscale, 16-bit, palette, RGBA, CMYK or EXIF-rotated file becomes the same picture in the trainer
and in the runtime. :mod:`tledge_runtime.preprocess` builds the model input from it.

Images are untrusted input, and everything that can cost memory is bounded *before* it is allocated:

- the pixel count a file's header declares (:attr:`ImageLimits.max_pixels`);
- the bytes one decode needs, mode conversions included (:attr:`ImageLimits.max_bytes`);
- the bytes all decodes of the process hold at once (:data:`DECODE_MEMORY`): concurrent requests
  of a server wait for memory instead of adding up to gigabytes.

Anything that goes wrong while decoding becomes an :class:`~tledge_runtime.errors.ImageError`
with a reason and the numbers, never a crash.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import numpy as np
from PIL import Image

from .errors import ImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# File endings tledge treats as images when it scans a dataset folder (compared lower-case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})

# Transparent pixels are composited onto white: what an image viewer shows, and
# independent of whatever colour values happen to sit under alpha = 0.
_BACKGROUND = (255, 255, 255)
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


@dataclass
class Opened:
    """An image whose header has been read and checked, its pixels not (necessarily) decoded yet.

    ``image`` is in the *stored* orientation; ``orientation`` is its EXIF orientation (1-8), applied
    later on the small, resized picture. ``swap_rb``: the pixels are BGR (an OpenCV frame) and red
    and blue are swapped at the very end, on the model-size result.
    """

    image: Image.Image
    name: str
    orientation: int = 1
    swap_rb: bool = False
    owned: bool = False  # the image came from a file or bytes we opened: close it when done
    file: Optional[BinaryIO] = None

    @property
    def size(self) -> tuple[int, int]:
        """The displayed ``(width, height)``: stored size, swapped by a 90-degree EXIF rotation."""
        w, h = self.image.size
        return (h, w) if self.orientation in (5, 6, 7, 8) else (w, h)

    def close(self) -> None:
        if self.owned:
            self.image.close()
        if self.file is not None:
            self.file.close()


def open_image(source: ImageInput, *, channel_order: str = "rgb", limits: ImageLimits = DEFAULT_LIMITS) -> Opened:
    """Read ``source``'s header (file path, encoded bytes, PIL image or ``HxW[xC]`` uint8 array) and check its size.

    Nothing is decoded yet for files and bytes; arrays are wrapped without copying.
    """
    order = _channel_order(channel_order)
    if isinstance(source, Image.Image):
        limits.check_pixels(*source.size, "<image>")
        return Opened(source, "<image>", _orientation(source))
    if isinstance(source, np.ndarray):
        return _open_array(source, order == "bgr", limits)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open_encoded(io.BytesIO(bytes(source)), "<bytes>", limits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{path}: no such file", hint="check the path", kind="missing")
        if path.is_dir():
            raise ImageError(f"{path}: is a directory, not an image file", hint="pass image files, not folders",
                             kind="unreadable")
        try:
            f = open(path, "rb")  # read lazily: only the header now, the pixels when decoded
        except OSError as e:  # permission denied, I/O error, symlink loop ...
            raise ImageError(f"{path}: cannot be read ({e.strerror or e})", hint="check the file's permissions",
                             kind="unreadable") from None
        try:
            return _open_encoded(f, str(path), limits)
        except BaseException:
            f.close()
            raise
    raise ImageError(f"cannot read an image from a {type(source).__name__}",
                     hint="pass a file path, bytes, a PIL image or an HxWx3 uint8 numpy array", kind="bad_array")


def _channel_order(channel_order: Any) -> str:
    order = channel_order.lower() if isinstance(channel_order, str) else None
    if order not in ("rgb", "bgr"):
        raise ImageError(f"unknown channel_order {channel_order!r}", hint="use 'rgb', or 'bgr' for OpenCV frames",
                         kind="bad_array")
    return order


def _open_encoded(fp: BinaryIO, name: str, limits: ImageLimits) -> Opened:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is too large (decompression bomb)", hint=_HINT_LIMITS,
                         kind="too_large") from None
    except Image.UnidentifiedImageError:
        if _is_empty(fp):
            raise ImageError(f"{name}: empty file (0 bytes)", hint="remove or replace the file", kind="empty") from None
        raise ImageError(f"{name}: not an image file Pillow can read", hint="remove the file or convert it to PNG/JPEG",
                         kind="not_image") from None
    except Exception as e:  # noqa: BLE001 - a header parser raises many types on garbage; all mean "bad file"
        raise ImageError(f"{name}: corrupt image header ({type(e).__name__}: {e})", hint="remove or re-save the file",
                         kind="corrupt") from None
    try:
        limits.check_pixels(*img.size, name)
    except ImageError:
        img.close()
        raise
    return Opened(img, name, _orientation(img), owned=True, file=fp)


def _is_empty(fp: BinaryIO) -> bool:
    try:
        fp.seek(0, io.SEEK_END)
        return fp.tell() == 0
    except (OSError, ValueError):
        return False


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8); 1 when absent or malformed (keep the stored orientation)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is not a reason to refuse the picture
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _open_array(a: np.ndarray, bgr: bool, limits: ImageLimits) -> Opened:
    """Wrap a camera frame as a PIL image without copying its pixels (when it is C-contiguous)."""
    if a.dtype != np.uint8:
        raise ImageError(f"image array has dtype {a.dtype}, expected uint8",
                         hint="convert with arr.astype(np.uint8) after scaling to 0..255", kind="bad_array")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not ((a.ndim == 2) or (a.ndim == 3 and a.shape[2] in (3, 4))) or min(a.shape[:2]) < 1:
        raise ImageError(f"image array has shape {a.shape}, expected HxW, HxWx3 or HxWx4",
                         hint="pass one frame in HWC layout (not CHW, not a batch)", kind="bad_array")
    height, width = a.shape[:2]
    limits.check_pixels(width, height, "<array>", "image array")
    a = np.ascontiguousarray(a)  # a copy only for strided views; bounded by the pixel limit just checked
    img = Image.fromarray(a)  # mode from the shape: L, RGB or RGBA
    if img.mode == "RGBA" and bgr:
        # BGRA: alpha compositing must see the real colours, so swap now (rare: 4-channel frames).
        img = Image.fromarray(np.ascontiguousarray(a[:, :, [2, 1, 0, 3]]))
        bgr = False
    return Opened(img, "<array>", swap_rb=bgr and img.mode == "RGB")


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


@contextmanager
def decoded(opened: Opened, *, draft: Optional[tuple[int, int]] = None, memory: DecodeMemory = DECODE_MEMORY,
            limits: ImageLimits = DEFAULT_LIMITS) -> Iterator[Image.Image]:
    """Decode ``opened`` into an ``L`` or ``RGB`` picture in its stored orientation, inside a memory reservation.

    ``draft``: for JPEG files, the smallest stored ``(width, height)`` the caller needs; libjpeg then
    decodes at 1/2, 1/4 or 1/8 scale directly (a 12 MP photo for a 224-px model costs a fraction of a
    full decode). The picture (and the memory reserved for it) is released when the block ends.
    """
    img = opened.image
    name = opened.name
    if draft is not None and img.format == "JPEG" and opened.owned:
        img.draft(None, (max(1, draft[0]), max(1, draft[1])))
    nbytes = estimate_bytes(img.mode, img.size)
    if nbytes > limits.max_bytes:
        w, h = img.size
        raise ImageError(f"{name}: decoding a {w}x{h} {img.mode} image needs {nbytes / _MB:.0f} MiB, more than the "
                         f"{limits.max_bytes / _MB:.0f} MiB allowed per image", hint=_HINT_LIMITS, kind="too_large")
    with memory.reserve(nbytes, name):
        picture = _decode_converted(img, name)
        try:
            yield picture
        finally:
            del picture


def _decode_converted(img: Image.Image, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()  # decode now, inside the try: truncated files fail here, not later
            return to_l_or_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is too large (decompression bomb)", hint=_HINT_LIMITS,
                         kind="too_large") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode", hint="downscale the image", kind="too_large") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data; all mean "bad file"
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})",
                         hint="remove or re-save the file", kind="corrupt") from None


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


def load_image(source: ImageInput, *, channel_order: str = "rgb", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """``source`` decoded in full as an 8-bit RGB PIL image, EXIF orientation applied.

    For looking at an image; the model input is made by :func:`tledge_runtime.preprocess.prepare_image`,
    which never holds more than it needs.
    """
    opened = open_image(source, channel_order=channel_order, limits=limits)
    try:
        with decoded(opened, limits=limits) as picture:
            upright = _transpose(picture, opened.orientation)
            rgb = upright.convert("RGB")  # a new picture (also for RGB): the opened one is closed below
    finally:
        opened.close()
    if opened.swap_rb:
        rgb = Image.fromarray(np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]))
    return rgb


# EXIF orientation -> the transpose that shows the stored pixels upright.
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    method = TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image ending (any case). Hidden files are never images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
