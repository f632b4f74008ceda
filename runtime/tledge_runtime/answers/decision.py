"""From a model's logits to its answer: calibrated probabilities and the decided class.

The default decision is the most probable class. A binary task may carry an **operating point**: a
threshold on one class's probability, chosen on held-out data for a recall or precision target (an
inspection line that must catch 95% of defective parts decides "defective" from a probability far below
0.5). Training, export verification, the benchmark and the runtime all decide through :func:`decide`, so
"accuracy", "agreement" and the label a device prints mean the same thing everywhere.

For the export gate, :func:`margins` gives each image's distance from its decision boundary in logit units
(how much the logits must move before the answer changes) and :func:`margin_change` how far another model's
logits moved that distance: PyTorch's margin against a format's numerical noise tells a decided image from a
borderline one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from tledge_runtime.model.answers import OperatingPoint


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature``, row by row, in float64 (the calibrated probabilities)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def decide(probs: np.ndarray, labels: Sequence[str], point: Optional[OperatingPoint] = None) -> np.ndarray:
    """The decided class index of each row of ``probs``: the top class, or the operating point's rule."""
    probs = np.asarray(probs)
    if point is None:
        return probs.argmax(axis=1)
    c = _index(labels, point)
    return np.where(probs[:, c] >= point.threshold, c, 1 - c)


def margins(logits: np.ndarray, labels: Sequence[str], point: Optional[OperatingPoint] = None,
            temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(decided class, margin)`` per row of ``logits``: how far, in logit units, the logits are from the
    decision boundary (the gap between the top two logits; with an operating point, between the two classes'
    logit difference and the threshold's)."""
    z = np.asarray(logits, dtype=np.float64)
    if point is None:
        order = np.argsort(-z, axis=1, kind="stable")
        rows = np.arange(len(z))
        return order[:, 0], z[rows, order[:, 0]] - z[rows, order[:, 1]]
    c = _index(labels, point)
    s = z[:, c] - z[:, 1 - c] - temperature * math.log(point.threshold / (1.0 - point.threshold))
    return np.where(s >= 0, c, 1 - c), np.abs(s)


def margin_change(reference: np.ndarray, other: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """How much ``other``'s logits moved each image's margin against ``reference``'s, in logit units: the largest
    change of the difference between the reference's decided class and any other class."""
    ref = np.asarray(reference, dtype=np.float64)
    oth = np.asarray(other, dtype=np.float64)
    rows = np.arange(len(ref))
    delta = oth - ref
    return np.abs(delta - delta[rows, decided][:, None]).max(axis=1)


def _index(labels: Sequence[str], point: OperatingPoint) -> int:
    if len(labels) != 2:
        raise ValueError(f"an operating point needs a binary task, this one has {len(labels)} classes")
    return list(labels).index(point.label)
