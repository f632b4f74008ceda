"""The exported out-of-distribution score in float32 matches the detector's float64 arithmetic to the fp32 export's
tolerance, also where the features sit far from the origin (pooled ReLU features do) and the classes are close."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tledge.answers import ood
from tledge_export.convert.ood_head import OODHead


def _features(rng, n: int, dims: int, centre: float, spread: float = 0.3, apart: float = 10.0) -> np.ndarray:
    """Two tight classes far apart (whitened, their centres are far from the origin), like a trained model's."""
    base = centre + rng.normal(0, 1.0, dims)
    labels = np.arange(n) % 2
    return base + apart * labels[:, None] + rng.normal(0, spread, (n, dims)), labels


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_the_graph_score_matches_the_fit_in_float32(method):
    rng = np.random.default_rng(0)
    train, labels = _features(rng, 1500, 1280, centre=0.5)
    detector = ood.fit(method, train, labels)
    test = np.concatenate([_features(rng, 100, 1280, centre=0.5)[0], rng.uniform(0, 6, (20, 1280))])
    expected = detector.score(test, np.zeros((len(test), 2)))
    head = OODHead(method, detector.arrays)
    with torch.no_grad():
        got = head(torch.from_numpy(test.astype(np.float32)), torch.zeros(len(test), 2))[:, 0].numpy()
    # the fp32 export's own bound on a score (tledge_runtime: |Δ| <= 1e-4 + 1e-4 * |score|)
    assert np.all(np.abs(got - expected) <= 1e-4 + 1e-4 * np.abs(expected)), np.max(np.abs(got - expected))


def test_detectors_fitted_before_the_mean_was_stored_still_score_alike():
    """Older checkpoints hold ``offset`` (the projected mean) instead of ``mean``: same score, both ways."""
    rng = np.random.default_rng(1)
    train, labels = _features(rng, 300, 64, centre=2.0)
    new = ood.fit("mahalanobis", train, labels)
    old = ood.Detector("mahalanobis", {"project": new.arrays["project"], "centres": new.arrays["centres"],
                                       "offset": new.arrays["project"] @ new.arrays["mean"]})
    x = train[:20]
    np.testing.assert_allclose(old.score(x, None), new.score(x, None), rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        scored = [OODHead("mahalanobis", d.arrays)(torch.from_numpy(x.astype(np.float32)), None) for d in (old, new)]
    np.testing.assert_allclose(scored[0].numpy(), scored[1].numpy(), rtol=1e-3, atol=1e-3)
