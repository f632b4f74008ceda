"""Prediction sets with a coverage guarantee (split conformal prediction), and the "unknown" rule.

A model's calibrated probabilities say how sure it is; a conformal set says which classes cannot be ruled out
at a chosen coverage. Fitted on held-out images (:mod:`tledge.answers.conformal`): the threshold is the
``ceil((n + 1) * coverage) / n`` quantile of the held-out images' scores, so on new images from the same
distribution the set holds the true class with probability at least ``coverage``. Two scores:

- ``lac`` (least ambiguous set-valued classifier): ``1 - p(y)``; a class is in the set when its probability is at
  least ``1 - threshold``. The smallest sets on average.
- ``aps`` (adaptive prediction sets): the probability mass of the classes ranked at or above ``y``; sets grow
  where the model spreads its probability.

A set of one class is an answer; more than one (or none) means "unsure: route to a person".
"""

from __future__ import annotations

import numpy as np

from tledge_runtime.model.answers import OOD, Conformal


def class_scores(probs: np.ndarray, score: str) -> np.ndarray:
    """The nonconformity score of every class of every row (``N x classes``): lower is more plausible."""
    probs = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cumulative = np.cumsum(ranked, axis=1)
    out = np.empty_like(probs)
    np.put_along_axis(out, order, cumulative, axis=1)
    return out


def prediction_sets(probs: np.ndarray, conformal: Conformal) -> list[np.ndarray]:
    """For each row, the class indices in its set, most probable first."""
    probs = np.asarray(probs, dtype=np.float64)
    inside = class_scores(probs, conformal.score) <= conformal.threshold + 1e-12
    order = np.argsort(-probs, axis=1, kind="stable")
    return [row[mask[row]] for row, mask in zip(order, inside)]


def unknown(ood_scores: np.ndarray, ood: OOD) -> np.ndarray:
    """Which rows score at or above the model's out-of-distribution threshold."""
    return np.asarray(ood_scores, dtype=np.float64) >= ood.threshold
