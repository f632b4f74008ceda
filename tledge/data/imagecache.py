"""Decode every image once, into one uint8 array, skipping and counting bad files.

A typical training loop decodes and resizes each JPEG/PNG again in every epoch.
tledge decodes each file once (in threads; Pillow releases the GIL while it
decodes and resizes) into ``N x H x W x 3`` uint8 arrays, in memory or, past
:data:`RAM_BUDGET_BYTES`, in memory-mapped files. Every view is made by the runtime's
own :func:`~tledge_runtime.image.preprocess.prepare_views`, the code a device runs:
validation and test images at exactly the model input; training images twice from one
decode, at the model input (the view the cached head features and AdaBN see, identical
to what the device sees) and somewhat larger for random-resized-crop augmentation.

A file that cannot be decoded is skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tledge.data.folders import Sample
from tledge.errors import DataError
from tledge.progress import progress
from tledge_runtime.errors import ImageError
from tledge_runtime.image.preprocess import prepare_views
from tledge_runtime.model.meta import Preprocess

log = logging.getLogger(__name__)

RAM_BUDGET_BYTES = int(float(os.environ.get("TLEDGE_CACHE_RAM_GB", "4")) * (1 << 30))
TRAIN_MARGIN = 1.25  # training images are stored this much larger than the model input


@dataclass
class DecodedImages:
    """Decoded images (uint8 NHWC, one array per geometry asked for) with their labels;
    ``skipped`` lists ``(path, kind, message)``."""

    views: list[np.ndarray]
    labels: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str, str]] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        """The images at the first geometry asked for."""
        return self.views[0]

    def __len__(self) -> int:
        return len(self.labels)


def train_geometry(p: Preprocess) -> Preprocess:
    """The geometry training images are stored at: the region the eval transform sees before its
    centre crop, ``TRAIN_MARGIN`` times larger, so random crops keep detail."""
    if p.resize == "crop":
        side = int(round(p.resize_size * TRAIN_MARGIN))
        return replace(p, height=side, width=side, crop_ratio=1.0)
    return replace(p, height=int(round(p.height * TRAIN_MARGIN)), width=int(round(p.width * TRAIN_MARGIN)))


def decode_images(samples: Sequence[Sample], *geometries: Preprocess, workers: int = 4, desc: str = "decode",
                  memmap_dir: Optional[Path] = None) -> DecodedImages:
    """Decode ``samples`` once, at each of ``geometries`` (resize/crop only, no normalisation), into uint8 arrays."""
    n = len(samples)
    views = [_allocate((n, g.height, g.width, 3), memmap_dir, f"{desc} {k}") for k, g in enumerate(geometries)]
    ok = np.zeros(n, dtype=bool)
    skipped: list[tuple[Path, str, str]] = []

    def work(i: int) -> None:
        try:
            for view, image in zip(views, prepare_views(samples[i].path, geometries)):
                view[i] = image
            ok[i] = True
        except ImageError as e:
            skipped.append((samples[i].path, e.kind, e.message))  # list.append is atomic under the GIL

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in progress(pool.map(work, range(n)), total=n, desc=desc, unit="img"):
            pass
    keep = np.flatnonzero(ok)
    labels = np.array([samples[i].label for i in keep], dtype=np.int64)
    if len(keep) < n:
        views = [v[keep] if not isinstance(v, np.memmap) else _compact(v, keep) for v in views]
    return DecodedImages(views, labels, [samples[i].path for i in keep], sorted(skipped))


def _allocate(shape: tuple[int, ...], memmap_dir: Optional[Path], name: str) -> np.ndarray:
    nbytes = int(np.prod(shape))
    if nbytes <= RAM_BUDGET_BYTES or memmap_dir is None:
        return np.empty(shape, dtype=np.uint8)
    memmap_dir.mkdir(parents=True, exist_ok=True)
    path = memmap_dir / f"{name.replace(' ', '_')}.u8.npy"
    log.info("caching %.1f GB of decoded images in %s", nbytes / 2**30, path)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)


def _compact(images: np.memmap, keep: np.ndarray) -> np.ndarray:
    """Move kept rows to the front of a memmap in place, so skipping files does not copy gigabytes."""
    for dst, src in enumerate(keep):
        if dst != src:
            images[dst] = images[src]
    return images[: len(keep)]


def summarize_skipped(skipped: Sequence[tuple[Path, str, str]], total: int) -> str:
    """One line: how many files were skipped and why, e.g. ``skipped 3 of 120 images: 2 corrupt, 1 empty``."""
    if not skipped:
        return ""
    by_kind = Counter(kind.replace("_", " ") for _, kind, _ in skipped)
    reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"skipped {len(skipped)} of {total} images: {reasons}"


def require_every_class(decoded: DecodedImages, classes: Sequence[str], split: str) -> None:
    """A class whose every file was bad is an error, not a silently smaller problem."""
    present = set(decoded.labels.tolist())
    lost = [c for i, c in enumerate(classes) if i not in present]
    if lost:
        raise DataError(f"{split} split: class(es) {', '.join(lost)} have no readable images "
                        f"({len(decoded.skipped)} files skipped)",
                        hint="see skipped.txt in the run folder, then fix or replace those files")
