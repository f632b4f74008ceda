"""The out-of-distribution ("unknown") detector: fitted on the run's own training images, no outlier needed.

Every method gives a score, higher = further from the training data, computed from what the network already
computes: the backbone's pooled features and the logits. The export puts the same arithmetic into the graph as
a second output (:mod:`tledge_export.convert.ood_head`), so every backend and precision computes it.

- ``mahalanobis``: the features projected on their 96 principal directions and whitened with the pooled
  within-class covariance (shrunk towards its mean variance); the score is the squared distance to the nearest
  class mean.
- ``knn``: the same projection, length-normalised; the score is one minus the cosine similarity to the
  ``K``-th nearest training image (a bank of training images, as many as the size budget allows).
- ``energy``: ``-T * logsumexp(logits / T)``; ``msp``: minus the top calibrated probability (the baseline).

The threshold keeps a chosen fraction (``--ood-keep``, default 0.95) of held-out in-distribution images below it
(:func:`threshold`). The parameters must stay small: at most 512 KB or 5% of the fp32 model file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

METHODS = ("mahalanobis", "knn", "energy", "msp")
# Principal directions kept (fewer when the size budget asks): on ELPV 96 separated far-away images best (AUROC
# 0.992 vs 0.991 at 64 and 0.983 at 32) and fit 512 KB for 1280-d features.
DIMENSIONS = 96
NEIGHBOUR = 10  # knn: the K-th nearest training image (robust to a few outliers in the training set)
# Added to the covariance's diagonal, relative to its mean variance. Whitening divides by the square root of each
# direction's variance: the smallest ones would turn int8's small feature errors into large score changes (on
# ELPV 0.05 keeps fp32 and int8 AUROC within 0.001 and flips fewer "unknown" decisions than 1e-3).
SHRINKAGE = 0.05


@dataclass
class Detector:
    """A fitted detector: ``method``, its arrays (float32, what the graph holds) and the temperature it uses."""

    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def nbytes(self) -> int:
        return int(sum(a.astype(np.float32).nbytes for a in self.arrays.values()))

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The score of every row (numpy, float64): what the graph's second output computes."""
        f = np.asarray(features, dtype=np.float64)
        a = {k: v.astype(np.float64) for k, v in self.arrays.items()}
        if self.method == "mahalanobis":
            u = _projected(f, a)
            d2 = ((u[:, None, :] - a["centres"][None]) ** 2).sum(-1)
            return d2.min(axis=1)
        if self.method == "knn":
            z = _projected(f, a)
            z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            sims = np.sort(z @ a["bank"].T, axis=1)[:, ::-1]
            return 1.0 - sims[:, min(NEIGHBOUR, sims.shape[1]) - 1]
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        top = z.max(axis=1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        if self.method == "energy":
            return -self.temperature * lse
        return -np.exp(top - lse)  # msp: minus the top probability

    def to_checkpoint(self) -> dict:
        """Plain data and tensors for best.pt (``torch.load(weights_only=True)`` reads them back)."""
        import torch

        return {"method": self.method, "temperature": self.temperature,
                "arrays": {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.arrays.items()}}

    @classmethod
    def from_checkpoint(cls, d: dict) -> Detector:
        return cls(d["method"], {k: v.numpy() for k, v in d["arrays"].items()}, float(d["temperature"]))


def fit(method: str, features: np.ndarray, labels: np.ndarray, temperature: float = 1.0,
        max_bytes: int = 512 * 1024) -> Detector:
    """A detector of ``method`` fitted on training ``features`` (N x D) and their ``labels``."""
    if method in ("energy", "msp"):
        return Detector(method, {}, temperature)
    f = np.asarray(features, dtype=np.float64)
    mean = f.mean(axis=0)
    room = max(2, (max_bytes - 64 * 1024) // (4 * f.shape[1]))  # the projection dominates the bytes
    d = int(min(DIMENSIONS, f.shape[1], max(2, len(f) - 1), room))
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    project = vt[:d]  # d x D, orthonormal rows
    z = (f - mean) @ project.T
    if method == "mahalanobis":
        return _mahalanobis(z, project, mean, np.asarray(labels), temperature)
    if method == "knn":
        return _knn(z, project, mean, temperature, max_bytes)
    raise ValueError(f"unknown out-of-distribution method {method!r}")


def _mahalanobis(z: np.ndarray, project: np.ndarray, mean: np.ndarray, labels: np.ndarray, t: float) -> Detector:
    classes = np.unique(labels)
    centres = np.stack([z[labels == c].mean(axis=0) for c in classes])
    within = z - centres[np.searchsorted(classes, labels)]
    cov = within.T @ within / max(len(z) - len(classes), 1)
    cov += SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    vals, vecs = np.linalg.eigh(cov)
    whiten = vecs @ np.diag(vals ** -0.5) @ vecs.T  # symmetric inverse square root
    a = whiten @ project  # features -> whitened coordinates in one matrix
    return Detector("mahalanobis", {"project": a, "mean": mean, "centres": centres @ whiten.T}, t)


def _knn(z: np.ndarray, project: np.ndarray, mean: np.ndarray, t: float, max_bytes: int) -> Detector:
    bank = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    fixed = (project.size + project.shape[0]) * 4
    room = max(NEIGHBOUR, (max_bytes - fixed) // (4 * bank.shape[1]))
    if len(bank) > room:  # an evenly spaced subset of the training images: the bank fits the size budget
        bank = bank[np.linspace(0, len(bank) - 1, room).astype(int)]
    return Detector("knn", {"project": project, "mean": mean, "bank": bank}, t)


def _projected(f: np.ndarray, a: dict[str, np.ndarray]) -> np.ndarray:
    """Features in the detector's coordinates. Centred *before* the projection: projecting first and subtracting
    the projected mean (``offset``, what detectors fitted before 2026-12-05 hold) cancels most digits in float32,
    and the exported graph must match PyTorch to 1e-4."""
    if "mean" in a:
        return (f - a["mean"]) @ a["project"].T
    return f @ a["project"].T - a["offset"]


def threshold(scores: np.ndarray, keep: float) -> float:
    """The score below which ``keep`` of these held-out in-distribution images fall (the smallest such value)."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), keep, method="higher"))


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Probability that an outside image scores higher than an inside one (ties count half)."""
    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    both = np.concatenate([inside, outside])
    ranks = _ranks(both)
    r_out = ranks[len(inside):].sum()
    n_in, n_out = len(inside), len(outside)
    return float((r_out - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_tpr(inside: np.ndarray, outside: np.ndarray, keep: float = 0.95) -> float:
    """Fraction of outside images below the threshold that keeps ``keep`` of the inside ones (FPR@95)."""
    return float((np.asarray(outside) < threshold(inside, keep)).mean())


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def best_method(results: dict[str, dict[str, float]]) -> Optional[str]:
    """The method with the highest AUROC (then lowest FPR@95) in a {method: {auroc, fpr95}} table."""
    if not results:
        return None
    return max(results, key=lambda m: (results[m]["auroc"], -results[m]["fpr95"]))
