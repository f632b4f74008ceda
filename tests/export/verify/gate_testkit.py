"""A simulated binary task for the export gate's tests: PyTorch's logits, a format's, and the true labels."""

from __future__ import annotations

import numpy as np


def binary_task(n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(reference logits, format logits, labels)``: margins spread like a real model's (most images clearly
    decided, a few near the boundary) and calibrated (an image is right with probability sigmoid(margin), so
    borderline images are right about half the time); the format = PyTorch + normal noise of sd ``noise``."""
    rng = np.random.default_rng(seed)
    margin = rng.gamma(2.0, 2.0, n)
    side = rng.integers(0, 2, n)
    ref = np.zeros((n, 2))
    ref[np.arange(n), side] = margin
    labels = side.copy()
    wrong = rng.random(n) > 1 / (1 + np.exp(-margin))
    labels[wrong] = 1 - labels[wrong]
    return ref, ref + rng.normal(0, noise, ref.shape), labels
