"""Splitting many inputs into model runs, and padding for graphs with a fixed batch size.

A fixed-batch graph (``tledge export --batch 8``) takes exactly its batch: the last, short batch is
padded with copies of its final row and the padding's outputs are dropped. Every place that runs a
graph over many inputs (the Classifier, export verification, calibration, sensitivity ranking, engine
checks) uses these two functions.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

CHUNK = 32  # rows per run of a dynamic-batch graph: bounds memory on long lists


def pad_to(batch: np.ndarray, size: Optional[int]) -> np.ndarray:
    """``batch`` with copies of its last row appended up to ``size`` rows (unchanged when ``size`` is None)."""
    n = len(batch)
    if size is None or n >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - n, axis=0)])


def batches(x: np.ndarray, fixed_batch: Optional[int] = None, chunk: int = CHUNK) -> Iterator[tuple[np.ndarray, int]]:
    """``(batch, n_real)`` pairs covering ``x``: ``fixed_batch`` rows each (the last padded), else up to ``chunk``."""
    step = fixed_batch or chunk
    for start in range(0, len(x), step):
        part = x[start:start + step]
        yield pad_to(part, fixed_batch), len(part)
