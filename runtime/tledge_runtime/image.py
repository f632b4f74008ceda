"""Reading images the same way everywhere: training, calibration, evaluation and on the device.

Every image that enters tledge passes through :func:`load_image`, so a grayscale,
16-bit, palette, RGBA, CMYK or EXIF-rotated file becomes the same RGB picture in
the trainer and in the runtime. Files are untrusted input: anything that goes
wrong while decoding becomes an :class:`~tledge_runtime.errors.ImageError` with a
reason, never a crash, and an image larger than :data:`MAX_PIXELS` is refused
before its pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

# Pillow's own default bomb limit (~89.5 MP, a 9459x9459 picture); override with TLEDGE_MAX_PIXELS.
MAX_PIXELS = int(os.environ.get("TLEDGE_MAX_PIXELS", "89478485"))

# File endings tledge treats as images when it scans a dataset folder (compared lower-case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# Transparent pixels are composited onto white: what an image viewer shows, and
# independent of whatever colour values happen to sit under alpha = 0.
_BACKGROUND = (255, 255, 255)


def load_image(source: ImageInput, *, channel_order: str = "rgb") -> Image.Image:
    """Return ``source`` as an 8-bit RGB PIL image.

    ``source`` may be a file path, the encoded bytes of a file, a PIL image, or a
    numpy array (``HxW`` grayscale or ``HxWx3``/``HxWx4`` uint8; ``channel_order="bgr"``
    for OpenCV frames).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return array_to_image(source, channel_order=channel_order)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{path}: no such file", hint="check the path", kind="missing")
        if path.is_dir():
            raise ImageError(f"{path}: is a directory, not an image file", hint="pass image files, not folders", kind="unreadable")
        try:
            with open(path, "rb") as f:
                return _decode(f, str(path))
        except OSError as e:  # permission denied, I/O error, symlink loop ...
            raise ImageError(f"{path}: cannot be read ({e.strerror or e})", hint="check the file's permissions", kind="unreadable") from None
    raise ImageError(f"cannot read an image from a {type(source).__name__}",
                     hint="pass a file path, bytes, a PIL image or an HxWx3 uint8 numpy array", kind="bad_array")


def _decode(fp: Any, name: str) -> Image.Image:
    """Open, bomb-check, fully decode and convert one encoded image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{name}: {width}x{height} pixels is more than the {MAX_PIXELS} allowed",
                                 hint="downscale the image, or raise TLEDGE_MAX_PIXELS if it is trusted",
                                 kind="too_large")
            img.load()  # decode now, inside the try: truncated files fail here, not later
            return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: image is too large (decompression bomb)",
                         hint="downscale the image, or raise TLEDGE_MAX_PIXELS if it is trusted", kind="too_large") from None
    except Image.UnidentifiedImageError:
        if _is_empty(fp):
            raise ImageError(f"{name}: empty file (0 bytes)", hint="remove or replace the file", kind="empty") from None
        raise ImageError(f"{name}: not an image file Pillow can read", hint="remove the file or convert it to PNG/JPEG", kind="not_image") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode", hint="downscale the image", kind="too_large") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data; all mean "bad file"
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})",
                         hint="remove or re-save the file", kind="corrupt") from None


def _is_empty(fp: Any) -> bool:
    try:
        fp.seek(0, io.SEEK_END)
        return fp.tell() == 0
    except Exception:  # noqa: BLE001
        return False


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, the same way every time.

    EXIF orientation is applied first (phones store rotated pixels plus a tag).
    16-bit and 32-bit grey levels are scaled to 0..255 (Pillow's own convert would clip them);
    transparency is composited onto white.
    """
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the stored orientation
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(img))).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _grey_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map 16-bit (or wider) grey levels to 8 bits by their range, not by clipping."""
    is_float = a.dtype.kind == "f"
    a = a.astype(np.float64)
    if is_float and np.nanmax(a, initial=0.0) <= 1.0:
        a = a * 255.0  # float images in 0..1
    elif np.nanmax(a, initial=0.0) > 255.0:
        a = a / 257.0  # 0..65535 -> 0..255 exactly at both ends
    return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)


def array_to_image(a: np.ndarray, *, channel_order: str = "rgb") -> Image.Image:
    """An ``HxW`` or ``HxWxC`` uint8 array (a camera frame) as an RGB PIL image."""
    order = channel_order.lower()
    if order not in ("rgb", "bgr"):
        raise ImageError(f"unknown channel_order {channel_order!r}", hint="use 'rgb', or 'bgr' for OpenCV frames", kind="bad_array")
    if a.dtype != np.uint8:
        raise ImageError(f"image array has dtype {a.dtype}, expected uint8",
                         hint="convert with arr.astype(np.uint8) after scaling to 0..255", kind="bad_array")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise ImageError(f"image array has an empty shape {a.shape}", hint="pass a non-empty frame", kind="bad_array")
        return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageError(f"image array has shape {a.shape}, expected HxW, HxWx3 or HxWx4",
                         hint="pass one frame in HWC layout (not CHW, not a batch)", kind="bad_array")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageError(f"image array of {a.shape[1]}x{a.shape[0]} pixels is too large", hint="downscale the frame", kind="too_large")
    if order == "bgr":
        a = a[:, :, [2, 1, 0, 3][: a.shape[2]]]
    img = Image.fromarray(np.ascontiguousarray(a))  # mode from the shape: RGB or RGBA
    return img if img.mode == "RGB" else to_rgb(img)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image ending (any case). Hidden files are never images."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
