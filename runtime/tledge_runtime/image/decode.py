"""Opening and decoding images the same way everywhere: training, calibration, evaluation and on the device.

Every image that enters tledge is opened by :func:`open_image` and decoded by :func:`decode`, so a
grayscale, 16-bit, palette, RGBA, CMYK or EXIF-rotated file becomes the same picture in the trainer
and in the runtime. :mod:`tledge_runtime.image.preprocess` builds the model input from it.

Images are untrusted input, and everything that can cost memory is bounded *before* it is allocated
(:mod:`tledge_runtime.image.budgets`); :mod:`tledge_runtime.image.convert` turns every mode into grey or RGB.

Anything that goes wrong while decoding becomes an :class:`~tledge_runtime.errors.ImageError`
with a reason and the numbers, never a crash.
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import numpy as np
from PIL import Image

from tledge_runtime.errors import ImageError
from tledge_runtime.image.budgets import (
    _HINT_LIMITS,
    _MB,
    DECODE_MEMORY,
    DEFAULT_LIMITS,
    DecodeMemory,
    ImageLimits,
    estimate_bytes,
)
from tledge_runtime.image.convert import to_l_or_rgb

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# File endings tledge treats as images when it scans a dataset folder (compared lower-case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})

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


def load_image(source: ImageInput, *, channel_order: str = "rgb", limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """``source`` decoded in full as an 8-bit RGB PIL image, EXIF orientation applied.

    For looking at an image; the model input is made by :func:`tledge_runtime.image.preprocess.prepare_image`,
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
