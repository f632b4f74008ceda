"""Calibrated scores: temperature scaling fitted on held-out images, and how to measure calibration.

A fine-tuned network is usually over-confident: its top probability is higher than how often it is right.
Temperature scaling divides the logits by one number ``T`` chosen to minimise the negative log-likelihood of
held-out labels; it never changes the ranking of classes (so accuracy stays), only how sure each answer says
it is. One parameter cannot overfit a few hundred images, and it travels in the model file as a single number
(:class:`tledge_runtime.model.answers.Answers.temperature`) that every backend applies the same way.

ECE (expected calibration error): the images are put in 15 equal-width bins of top probability; ECE is the
image-weighted mean gap between each bin's accuracy and its mean top probability.
"""

from __future__ import annotations

import math

import numpy as np

from tledge_runtime.answers.decision import probabilities

ECE_BINS = 15
# Temperatures searched (log-uniform). A validation split the model separates perfectly drives the NLL-optimal T
# to 0 (every answer "certain"); 0.25 keeps such a model's probabilities finite and its prediction sets sane, and is
# below what real fine-tuned models need (label smoothing makes them under-confident: ELPV fits T = 0.62).
T_RANGE = (0.25, 8.0)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising :func:`nll` on these held-out images (golden-section search on log T; the NLL of
    temperature scaling is unimodal in log T)."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(80):  # the interval shrinks by 0.618 per step: far below 1e-6 in log T
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def at_bound(temperature: float) -> bool:
    """Whether a fitted temperature sits at the edge of the search (the NLL wanted more: too few or too easy
    held-out images to say how sure the model should be)."""
    return min(abs(math.log(temperature / b)) for b in T_RANGE) < 1e-3


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class probability, equal-width bins (a fraction, not percent)."""
    probs = np.asarray(probs, dtype=np.float64)
    top, pred = probs.max(axis=1), probs.argmax(axis=1)
    right = pred == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(top, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(right[inside].mean() - top[inside].mean())
    return float(total / max(len(top), 1))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """``(mean top probability, accuracy, images)`` per non-empty bin: the points of a reliability diagram."""
    probs = np.asarray(probs, dtype=np.float64)
    top, right = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels)
    which = np.clip(np.digitize(top, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    return [(float(top[which == b].mean()), float(right[which == b].mean()), int((which == b).sum()))
            for b in range(bins) if (which == b).any()]


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE and NLL before (T = 1) and after (``temperature``) on one split."""
    before, after = probabilities(logits, 1.0), probabilities(logits, temperature)
    return {"ece_before": ece(before, labels), "ece_after": ece(after, labels),
            "nll_before": nll(logits, labels, 1.0), "nll_after": nll(logits, labels, temperature),
            "images": int(len(labels))}
