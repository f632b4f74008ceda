"""The runtime's numpy/Pillow preprocessing equals the training eval transform (torchvision), pixel for pixel.

Preprocessing drift is the first cause of "the model on the device is worse than in PyTorch".
Both sides read the same files through tledge_runtime.image.load_image (one decoder for every
mode); the training side then runs torchvision's Resize/CenterCrop/ToTensor/Normalize preset,
the runtime its own numpy code. The bound is 1/255 after scaling, i.e. within one grey level.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tledge_runtime.image import load_image
from tledge_runtime.meta import Preprocess
from tledge_runtime.preprocess import preprocess

from tledge.transforms import Normalize, eval_transform

rng = np.random.default_rng(7)


def _rgb(h: int, w: int) -> np.ndarray:
    # Smooth gradients plus noise: resampling differences would show up, flat colour would hide them.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    return (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _files(tmp_path):
    """One real file per image mode tledge must treat consistently."""
    files = {}
    files["rgb.jpg"] = Image.fromarray(_rgb(480, 640))
    files["gray.png"] = Image.fromarray(_rgb(300, 300)[:, :, 0])
    files["rgba.png"] = Image.fromarray(np.dstack([_rgb(120, 90), rng.integers(0, 256, (120, 90), dtype=np.uint8)]))
    pal = Image.fromarray(_rgb(64, 80)).quantize(32)
    pal.info["transparency"] = 3
    files["palette.png"] = pal
    files["gray16.png"] = Image.fromarray((_rgb(91, 37)[:, :, 1].astype(np.uint16) * 257))
    files["cmyk.jpg"] = Image.fromarray(_rgb(200, 150)).convert("CMYK")
    files["tiny.png"] = Image.fromarray(_rgb(1, 1))
    paths = {}
    for name, img in files.items():
        path = tmp_path / name
        img.save(path, transparency=3) if name == "palette.png" else img.save(path)
        paths[name] = path
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    rotated = tmp_path / "exif_rotated.jpg"
    Image.fromarray(_rgb(60, 100)).save(rotated, exif=exif)
    paths["exif_rotated.jpg"] = rotated
    return paths


PREPROCESS = [
    Preprocess(height=64, width=64),
    Preprocess(height=56, width=56, crop_ratio=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    Preprocess(height=48, width=72, resize="stretch"),
    Preprocess(height=224, width=224, crop_ratio=0.875),
]


@pytest.mark.parametrize("p", PREPROCESS, ids=lambda p: f"{p.resize}-{p.height}x{p.width}-{p.interpolation}")
def test_runtime_preprocessing_equals_the_training_eval_transform(tmp_path, p):
    reference = eval_transform(p)
    for name, path in _files(tmp_path).items():
        train_side = reference(load_image(path)).numpy()
        device_side = preprocess(path, p)[0]
        assert device_side.shape == train_side.shape == (3, p.height, p.width), name
        # Scale back to grey levels: the difference must stay within one level.
        diff = np.abs(device_side - train_side) * np.asarray(p.std).reshape(3, 1, 1) / p.scale
        assert diff.max() <= 1.0, f"{name}: max difference {diff.max():.3f} grey levels"


def test_training_normalisation_equals_the_runtime(tmp_path):
    """The fast training path (decoded uint8 + torch Normalize) feeds the same floats as the runtime."""
    from tledge_runtime.preprocess import to_uint8_hwc

    p = PREPROCESS[1]
    for path in _files(tmp_path).values():
        u8 = torch.from_numpy(to_uint8_hwc(path, p).copy())[None]
        np.testing.assert_allclose(Normalize(p)(u8).numpy(), preprocess(path, p), atol=1e-6)


def test_modes_convert_the_same_way_every_time(tmp_path):
    paths = _files(tmp_path)
    gray = np.asarray(load_image(paths["gray.png"]))
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()
    g16 = np.asarray(load_image(paths["gray16.png"]))
    expected = _rgb_levels_from_16bit(paths["gray16.png"])
    assert np.abs(g16[:, :, 0].astype(int) - expected).max() <= 1  # scaled by range, not clipped at 255
    rot = load_image(paths["exif_rotated.jpg"])
    assert rot.size == (60, 100)  # EXIF orientation applied: stored 100x60, displayed 60x100
    rgba = np.asarray(load_image(paths["rgba.png"]))
    assert rgba.shape[2] == 3
    for path in paths.values():  # bytes and paths decode identically
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(path.read_bytes())))


def _rgb_levels_from_16bit(path) -> np.ndarray:
    a = np.asarray(Image.open(path)).astype(np.float64)
    return np.round(a / 257).astype(int)


def test_transparent_pixels_become_white_not_whatever_lies_under_them():
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[..., :3] = (10, 20, 30)  # colour under fully transparent alpha
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert (np.asarray(load_image(buf.getvalue())) == 255).all()
