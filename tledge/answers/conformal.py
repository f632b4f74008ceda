"""Split conformal prediction, fitted on held-out images: the threshold that makes prediction sets hold the true
class at a chosen coverage (the arithmetic of :mod:`tledge_runtime.answers.conformal`, which applies it).

The few lines of quantile arithmetic below are the whole method; a library (``crepes``, ``mapie``) would add a
dependency and its own probability pipeline for what is one ``np.quantile`` with the finite-sample correction.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tledge_runtime.answers.conformal import class_scores, prediction_sets
from tledge_runtime.model.answers import Conformal

MIN_IMAGES = 20  # below this the finite-sample quantile is the maximum score: sets say little


def fit_conformal(probs: np.ndarray, labels: np.ndarray, coverage: float, score: str,
                  where: str = "val split") -> tuple[Optional[Conformal], str]:
    """The conformal threshold from held-out ``probs`` and ``labels``; ``(None, why)`` when there are too few."""
    n = len(labels)
    if n < MIN_IMAGES:
        return None, f"conformal sets: only {n} held-out images ({MIN_IMAGES} needed)"
    true = class_scores(probs, score)[np.arange(n), np.asarray(labels)]
    level = min(1.0, math.ceil((n + 1) * coverage) / n)  # the finite-sample correction of split conformal
    threshold = float(np.quantile(true, level, method="higher"))
    measured = f"{where}, {n} images, {score} score"
    return Conformal(score, coverage, min(max(threshold, 0.0), 1.0), n, measured), measured


def set_report(probs: np.ndarray, labels: np.ndarray, conformal: Conformal) -> dict[str, float]:
    """Empirical coverage, mean set size and the fraction of singleton sets on a split."""
    sets = prediction_sets(probs, conformal)
    labels = np.asarray(labels)
    covered = np.array([y in s for y, s in zip(labels, sets)])
    sizes = np.array([len(s) for s in sets])
    return {"coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
            "singletons": float((sizes == 1).mean()), "images": int(len(labels))}
