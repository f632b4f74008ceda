"""Out-of-distribution probes: synthetic frames no classifier was trained on (noise, flat frames, gradients,
stripes, checkerboards), generated here so every export makes the same ones. Export verification checks that
each format calls them "unknown" exactly when PyTorch does, next to the held-out images."""

from __future__ import annotations

import numpy as np

FLAT_LEVELS = (0, 32, 96, 128, 160, 224, 255)


def probe_images(height: int, width: int, seed: int = 0) -> np.ndarray:
    """``N x height x width x 3`` uint8 probe frames (N = 24), seeded."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = [np.full((height, width, 3), v, np.float64) for v in FLAT_LEVELS]
    frames += [rng.uniform(0, 255, (height, width, 3)) for _ in range(3)]  # uniform noise
    frames += [np.clip(rng.normal(128, 50, (height, width, 3)), 0, 255) for _ in range(2)]  # gaussian noise
    frames += [np.repeat((255 * x / max(width - 1, 1))[..., None], 3, 2),
               np.repeat((255 * y / max(height - 1, 1))[..., None], 3, 2),
               np.repeat((255 * np.hypot(x - width / 2, y - height / 2) / max(height, width))[..., None], 3, 2)]
    for period in (2, 8):
        frames.append(np.repeat((255 * ((x // period + y // period) % 2))[..., None], 3, 2))  # checkerboards
        frames.append(np.repeat((255 * ((x // period) % 2))[..., None], 3, 2))  # stripes
    colours = ((230, 30, 30), (30, 200, 40), (40, 40, 230), (240, 220, 40), (200, 40, 200))
    frames += [np.broadcast_to(np.array(c, np.float64), (height, width, 3)) for c in colours]
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)
