"""The one preprocessing path: geometry, orientation, modes, channel order, JPEG draft decoding and image budgets.

Training calls the same functions (tests/tledge/test_preprocess_parity.py proves it on the code paths it
uses), so these tests pin down what the path does, and that its shortcuts (box resampling, integer
reduction, draft decoding, swapping channels after the resize) change nothing a model could notice.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tledge_runtime.errors import ImageError
from tledge_runtime.image.budgets import DecodeMemory, ImageLimits
from tledge_runtime.image.decode import load_image
from tledge_runtime.image.preprocess import REDUCING_GAP, plan, prepare_image, prepare_views
from tledge_runtime.model.meta import Preprocess

rng = np.random.default_rng(3)

POLICIES = [
    Preprocess(height=32, width=32),
    Preprocess(height=28, width=28, crop_ratio=0.875, interpolation="bicubic"),
    Preprocess(height=24, width=40, resize="stretch", interpolation="nearest"),
]


def _picture(h: int, w: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus noise: resampling differences show up, flat colour would hide them."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return (base[:, :, :channels] + rng.normal(0, 12, (h, w, channels))).clip(0, 255).astype(np.uint8)


def _resize_then_crop(img: Image.Image, p: Preprocess) -> np.ndarray:
    """The textbook definition (torchvision's Resize + CenterCrop on a PIL image), full size, no shortcuts."""
    resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}[p.interpolation]
    if p.resize == "stretch":
        return np.asarray(img.resize((p.width, p.height), resample))
    w, h = img.size
    size = p.resize_size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    big = img.resize(new, resample)
    top, left = int(round((new[1] - p.height) / 2.0)), int(round((new[0] - p.width) / 2.0))
    return np.asarray(big.crop((left, top, left + p.width, top + p.height)))


@pytest.mark.parametrize("p", POLICIES, ids=lambda p: f"{p.resize}-{p.interpolation}")
@pytest.mark.parametrize("hw", [(20, 26), (45, 31), (300, 400), (97, 41)])
def test_box_resampling_matches_resize_then_crop(p, hw):
    """Without integer reduction (< 2x the model size) the output equals resize-then-crop to one grey level;
    with it (larger pictures) to a few, the price of a 6x cheaper resize (measured in preprocess_speed.py)."""
    a = _picture(*hw)
    got = prepare_image(a, p).astype(int)
    want = _resize_then_crop(Image.fromarray(a), p).astype(int)
    assert got.shape == want.shape == (p.height, p.width, 3)
    box = plan(hw[1], hw[0], p).box
    reduced = (box[2] - box[0]) / p.width >= 2 * REDUCING_GAP or (box[3] - box[1]) / p.height >= 2 * REDUCING_GAP
    diff = np.abs(got - want)
    assert diff.max() <= (12 if reduced else 1), diff.max()
    assert diff.mean() <= (1.0 if reduced else 0.35), diff.mean()  # +-1: fixed-point filter weights


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("p", POLICIES[:2] + [Preprocess(height=24, width=40, resize="stretch")],
                         ids=lambda p: p.resize if isinstance(p, Preprocess) else p)
def test_exif_orientation_is_applied_after_the_resize_as_if_before(tmp_path, orientation, p):
    stored = _picture(37, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = load_image(path)  # the displayed picture, transposed at full size
    assert upright.size == ((37, 64) if orientation >= 5 else (64, 37))
    got = prepare_image(path, p).astype(int)
    want = prepare_image(np.asarray(upright), p).astype(int)
    assert np.abs(got - want).max() <= 1  # transpose and resample commute up to the order of rounding


def test_bgr_frames_equal_rgb_frames_with_channels_swapped():
    rgb = _picture(720, 1280)
    p = POLICIES[1]
    np.testing.assert_array_equal(prepare_image(np.ascontiguousarray(rgb[:, :, ::-1]), p, channel_order="bgr"),
                                  prepare_image(rgb, p))
    np.testing.assert_array_equal(prepare_image(rgb[100:600, 200:900], p), prepare_image(rgb[100:600, 200:900].copy(), p))


def test_grey_and_alpha_modes():
    grey = _picture(50, 60)[:, :, 0]
    out = prepare_image(grey, POLICIES[0])
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    np.testing.assert_array_equal(out[:, :, 0], prepare_image(np.dstack([grey] * 3), POLICIES[0])[:, :, 0])
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)  # colour under fully transparent alpha
    assert (prepare_image(rgba, POLICIES[0]) == 255).all()  # composited onto white


def test_high_bit_depth_is_scaled_by_range_without_float64_copies():
    a16 = (_picture(91, 37)[:, :, 1].astype(np.uint16) * 257)
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, "PNG")
    img = load_image(buf.getvalue())
    np.testing.assert_array_equal(np.asarray(img)[:, :, 0], np.round(a16 / 257).astype(np.uint8))
    floats = Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64), "F")
    assert np.asarray(load_image(floats))[-1, -1, 0] == 255 and np.asarray(load_image(floats))[0, 0, 0] == 0


def _jpeg(a: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_large_jpegs_decode_at_a_reduced_scale_and_views_equal_single_calls():
    data = _jpeg(_picture(1080, 1920))
    p = Preprocess(height=32, width=32, interpolation="bicubic")
    fast = prepare_image(data, p).astype(int)
    full = _resize_then_crop(Image.open(io.BytesIO(data)).convert("RGB"), p).astype(int)
    assert np.abs(fast - full).mean() < 2.0  # DCT-domain scaling: a different, equally fair, downscale
    big = Preprocess(height=400, width=400)  # needs the full-resolution decode
    views = prepare_views(data, (big, p))
    np.testing.assert_array_equal(views[0], prepare_image(data, big))
    np.testing.assert_array_equal(views[1], prepare_image(data, p))


@pytest.mark.parametrize("shape", [(1, 20000), (20000, 1), (3, 60000), (60000, 2)])
@pytest.mark.parametrize("p", POLICIES, ids=lambda p: p.resize)
def test_thin_images_cost_model_size_not_the_resize_target(shape, p):
    buf = io.BytesIO()
    Image.fromarray(_picture(*shape)).save(buf, "PNG")
    t0 = time.perf_counter()
    out = prepare_image(buf.getvalue(), p)
    assert out.shape == (p.height, p.width, 3)
    assert time.perf_counter() - t0 < 5.0  # the old path built a 224 x 4.5M-pixel intermediate here


def test_limits_refuse_with_the_numbers_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buf, "PNG")
    with pytest.raises(ImageError, match=r"3000x2000 = 6,000,000 pixels is more than the 1,000,000") as e:
        prepare_image(buf.getvalue(), POLICIES[0], limits=ImageLimits(max_pixels=1_000_000))
    assert e.value.kind == "too_large"
    rgb = io.BytesIO()
    Image.new("RGB", (3000, 2000)).save(rgb, "PNG")  # 4 bytes per pixel in Pillow: 23 MiB
    with pytest.raises(ImageError, match=r"needs 23 MiB, more than the 8 MiB allowed per image"):
        prepare_image(rgb.getvalue(), POLICIES[0], limits=ImageLimits(max_bytes=8 << 20))
    with pytest.raises(ImageError, match="image array of 3000x2000"):
        prepare_image(np.zeros((2000, 3000, 3), np.uint8), POLICIES[0], limits=ImageLimits(max_pixels=1_000_000))


def test_decode_memory_is_shared_by_concurrent_decodes():
    memory = DecodeMemory(100, timeout_s=0.2)
    with pytest.raises(ImageError, match="more than the"):
        with memory.reserve(101, "big"):
            pass
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with memory.reserve(80, "first"):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    with pytest.raises(ImageError, match="waited") as e:  # 80 + 30 > 100: waits, then gives up
        with memory.reserve(30, "second"):
            pass
    assert e.value.kind == "busy"
    release.set()
    t.join(5)
    with memory.reserve(100, "third"):  # everything was returned
        assert memory.in_use == 100
    assert memory.in_use == 0
