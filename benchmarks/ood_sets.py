"""The outside images of the out-of-distribution protocol (benchmarks/ood_protocol.py), all from pip packages or
generated: scikit-image's bundled pictures (photos, microscopy, text, textures, 200 small faces), scikit-learn's
two sample photos and 300 of its handwritten digits (8x8, upscaled), synthetic frames (noise, flat grey levels,
gradients); and near-distribution shifts of in-distribution images (blur, under/over-exposure, 90° rotation),
reported but never used to choose anything."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

SKIMAGE = ("astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
           "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
           "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text")


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    return np.ascontiguousarray(a[..., :3])


def photos() -> list[np.ndarray]:
    """scikit-image's and scikit-learn's bundled pictures (the ones that load offline)."""
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE:
        try:
            out.append(_rgb(getattr(data, name)()))
        except Exception:  # noqa: BLE001 - a picture this scikit-image would download: left out
            continue
    out += [_rgb(face) for face in data.lfw_subset()]
    out += [_rgb(img) for img in load_sample_images().images]
    return out


def digits(n: int = 300, seed: int = 0) -> list[np.ndarray]:
    """``n`` of scikit-learn's 8x8 digits, upscaled to 64 px (white on black, as shipped)."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    rows = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return [_rgb(np.array(Image.fromarray((images[i] * 255 / 16).astype(np.uint8)).resize((64, 64))))
            for i in rows]


def synthetic(size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Noise (uniform, gaussian, coloured), flat grey levels and gradients: a lens cap, a dead sensor, a test card."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    out = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(10)]
    out += [np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(10)]
    out += [np.full((size, size, 3), v, np.uint8) for v in np.linspace(0, 255, 12).astype(int)]
    for g in (x, y, (x + y) / 2, np.hypot(x - 0.5, y - 0.5)):
        for invert in (False, True):
            v = (1 - g) if invert else g
            out.append(_rgb((255 * v / max(v.max(), 1e-9)).astype(np.uint8)))
    return out


def shifts(images: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Near-distribution versions of in-distribution images: blurred, under- and over-exposed, rotated 90°."""
    def pil(f):
        return [np.asarray(f(Image.fromarray(a))) for a in images]

    return {"blur": pil(lambda im: im.filter(ImageFilter.GaussianBlur(3))),
            "under-exposed": [np.clip(a.astype(np.float64) * 0.35, 0, 255).astype(np.uint8) for a in images],
            "over-exposed": [np.clip(a.astype(np.float64) * 1.8, 0, 255).astype(np.uint8) for a in images],
            "rotated 90°": [np.ascontiguousarray(np.rot90(a)) for a in images]}
