"""The gate that tells noise from loss (tledge_export.verify.gate): a paired interval for every accuracy change,
agreement counted on decided images, never a refusal for one image, always one for a real loss."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from tledge_export.verify.compare import compare
from tledge_export.verify.gate import paired_interval
from tledge_runtime.model.answers import Answers, OperatingPoint
from tledge_runtime.model.verification import Budget

from .gate_testkit import binary_task

N = 852  # the demo's verification set
FP16 = Budget.accuracy(0.1, 99.0)
INT8 = Budget.accuracy(1.0, 99.0)


def _set(n: int = N, seed: int = 0, noise: float = 0.02):
    """PyTorch's logits of a binary task, a format's (PyTorch + small numerical noise) and the labels."""
    return binary_task(n, seed, noise)


def _flip(logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = logits.copy()
    out[rows] = out[rows][:, ::-1]  # the answer of each row changes, by its whole margin
    return out


@pytest.mark.parametrize("c, b", [(6, 4), (0, 1), (0, 10), (14, 4), (3, 0), (40, 10)])
def test_interval_is_the_exact_clopper_pearson_one(c, b):
    m, alpha = c + b, 0.05
    lo = 0.0 if c == 0 else beta.ppf(alpha / 2, c, m - c + 1)
    hi = 1.0 if c == m else beta.ppf(1 - alpha / 2, c + 1, m - c)
    low, high = paired_interval(c, b, N)
    assert low == pytest.approx(100 * m / N * (2 * lo - 1), abs=1e-9)
    assert high == pytest.approx(100 * m / N * (2 * hi - 1), abs=1e-9)
    assert low <= 100 * (c - b) / N <= high


def test_one_image_is_never_a_refusal_even_over_the_fp16_budget():
    ref, fmt, labels = _set()
    right = np.flatnonzero((ref.argmax(1) == labels) & (np.abs(ref[:, 0] - ref[:, 1]) > 3))
    v = compare(_flip(fmt, right[:1]), ref, labels, FP16)
    assert -v.accuracy_delta_points > FP16.max_drop_points  # 0.117 points, more than the budget ...
    assert v.passed, v.failures  # ... but one image; the point rule refused exactly this
    old = compare(_flip(fmt, right[:1]), ref, labels, Budget("accuracy", max_drop_points=0.1, min_agreement=99.0,
                                                              rule="point"))
    assert not old.passed


def test_the_demo_case_int8_noise_flips_borderline_images_both_ways_and_passes():
    """The issue's demo: about 1% of 852 answers changed (4 right -> wrong, 6 wrong -> right there), every one of
    them an image near the boundary; the point rule refused it for agreement 98.83% < 99%."""
    ref, _, labels = _set()
    noisy = ref + np.random.default_rng(3).normal(0, 0.35, ref.shape)  # int8-like rounding everywhere
    v = compare(noisy, ref, labels, INT8)
    assert 100 * v.agreement < 99 and v.flips.to_wrong and v.flips.to_correct
    assert v.passed, v.failures
    assert v.flips_decided <= 0.01 * v.decided and v.flips_borderline > 0
    assert v.accuracy_interval[0] < 0 < v.accuracy_interval[1]
    old = compare(noisy, ref, labels, Budget("accuracy", max_drop_points=1.0, min_agreement=99.0, rule="point"))
    assert not old.passed


def test_a_real_loss_is_refused_with_its_interval():
    ref, fmt, labels = _set()
    right = np.flatnonzero(ref.argmax(1) == labels)
    v = compare(_flip(fmt, right[:20]), ref, labels, INT8)  # 20 decided images broken: -2.35 points
    assert not v.passed
    text = " ".join(v.failures)
    assert "accuracy drop 2.35 points > budget 1" in text and "interval" in text and "lies below zero" in text
    assert "agreement with PyTorch on decided images" in text and v.accuracy_interval[1] < 0


def test_decided_changes_fail_agreement_even_when_accuracy_holds():
    """As many decided images fixed as broken: accuracy is unchanged, the model is not."""
    ref, fmt, labels = _set()
    pred = ref.argmax(1)
    m = np.abs(ref[:, 0] - ref[:, 1])
    wrong = np.flatnonzero((pred != labels) & (m > 2))[:8]
    right = np.flatnonzero((pred == labels) & (m > 2))[:len(wrong)]
    assert len(wrong) >= 6
    v = compare(_flip(fmt, np.concatenate([right, wrong])), ref, labels, INT8)
    assert v.accuracy_delta_points == 0 and v.flips_decided == 2 * len(wrong)
    assert not v.passed and any("decided images" in f for f in v.failures)


def test_borderline_changes_do_not_count_against_agreement():
    ref, fmt, labels = _set()
    m = np.abs(ref[:, 0] - ref[:, 1])
    noisy = ref + np.random.default_rng(1).normal(0, 0.8, ref.shape)  # a very noisy format: numerics, not a change
    v = compare(noisy, ref, labels, INT8)
    changed = noisy.argmax(1) != ref.argmax(1)
    assert changed.sum() > 0.01 * N  # the point rule's 99% agreement would refuse this
    assert v.flips_decided < changed.sum() and v.passed, v.failures
    assert np.all(m[changed] <= v.noise * 2)  # what changed sat near the boundary


def test_a_broken_model_cannot_hide_behind_its_own_noise():
    ref, _, labels = _set()
    garbage = np.random.default_rng(2).normal(0, 10, ref.shape)
    v = compare(garbage, ref, labels, INT8)
    assert not v.passed and any("numerical noise" in f for f in v.failures)


def test_per_class_budget_uses_each_class_interval():
    ref, fmt, labels = _set()
    pred = ref.argmax(1)
    cls1 = np.flatnonzero((pred == labels) & (labels == 1))
    one = compare(_flip(fmt, cls1[:1]), ref, labels, Budget.accuracy(1.0, 0.0, max_class_drop_points=0.1))
    many = compare(_flip(fmt, cls1[:15]), ref, labels, Budget.accuracy(5.0, 0.0, max_class_drop_points=1.0))
    assert one.passed and not many.passed and "class '1' lost" in many.failures[0]


def test_an_operating_point_decides_both_models():
    ref, fmt, labels = _set()
    point = OperatingPoint("1", 0.2, "recall=0.95")
    v = compare(fmt, ref, labels, INT8, classes=["0", "1"], answers=Answers(1.0, point))
    p1 = 1 / (1 + np.exp(ref[:, 0] - ref[:, 1]))
    assert v.accuracy_reference == pytest.approx(((p1 >= 0.2).astype(int) == labels).mean())
    assert v.decision.startswith("1 when p(1) >= 0.2") and v.passed


def test_fp32_ood_score_is_bounded_at_the_threshold_scale():
    """fp32: a squared distance near zero may move by float32 noise times the threshold's scale (the demo's case:
    0.0078 on a score of 10 with the threshold at 140); a real difference is still refused."""
    from tledge_export.verify.compare import compare_scores
    from tledge_runtime.model.answers import OOD

    ref, fmt, labels = binary_task(200, 0, 0.0)
    v = compare(fmt, ref, labels, Budget("logits", atol=1e-4, rtol=1e-4))
    ood = OOD("mahalanobis", "ood_score", 140.0, 0.95, "test")
    reference = np.linspace(5.0, 400.0, 200)
    near = reference.copy()
    near[0] += 0.0078  # under 1e-4 + 1e-4 * 140; over 1e-4 + 1e-4 * 5
    assert compare_scores(v, near, reference, ood).passed
    far = reference.copy()
    far[0] += 0.05
    judged = compare_scores(v, far, reference, ood)
    assert not judged.passed and "max(|score|, threshold 140)" in judged.failures[-1]
    bigger = reference.copy()
    bigger[-1] += 0.03  # 1e-4 * 400 = 0.04: a far score keeps its own relative bound
    assert compare_scores(v, bigger, reference, ood).passed
