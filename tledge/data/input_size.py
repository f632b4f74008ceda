"""The input size a run trains at when ``--img-size`` is not given.

The architecture's ImageNet size (Lite0 224), unless the images are smaller than that: upscaling an 8-pixel
digit to 224 pixels adds no information and costs 12 times the pixels of 64 (issue 23; RESULTS §12: digits
at 64 px trained 7x faster per epoch and were as accurate). Then the images' typical shorter side, rounded
up to a multiple of 32 (the backbone's stride), and never under 64 px: below that the deepest stage of an
ImageNet network sees a 1-pixel map and its pretrained features stop describing anything.

Only headers are read (a seeded sample of the training images), through the runtime's checked opener, so a
hostile or broken file costs nothing and is skipped here (the decode later counts it).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from tledge_runtime.errors import ImageError
from tledge_runtime.image.decode import open_image

MIN_INPUT = 64  # pixels: the smallest input an ImageNet backbone still describes well
STRIDE = 32  # round to the backbone's total stride, so every stage's map has whole pixels
SAMPLE = 64  # headers read; the median of 64 sizes is stable for any folder a user would train on


def typical_short_side(paths: Sequence[Path], *, sample: int = SAMPLE, seed: int = 0) -> Optional[int]:
    """The median shorter side (as displayed) of a seeded sample of ``paths``; None when none could be read."""
    chosen = random.Random(seed).sample(list(paths), min(sample, len(paths)))
    sides = []
    for path in chosen:
        try:
            opened = open_image(path)
        except ImageError:
            continue
        try:
            sides.append(min(opened.size))
        finally:
            opened.close()
    return int(statistics.median(sides)) if sides else None


def input_size(arch_size: int, short_side: Optional[int]) -> int:
    """``arch_size``, or the images' own size when they are smaller (rounded up to the stride, at least 64)."""
    if short_side is None or short_side >= arch_size:
        return arch_size
    rounded = -(-short_side // STRIDE) * STRIDE
    return min(arch_size, max(MIN_INPUT, rounded))
