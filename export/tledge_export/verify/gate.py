"""The gate: whether an exported model's answers differ from PyTorch's by more than its budget allows, judged at
the resolution the verification set has.

Two rules for an accuracy budget (:data:`tledge_runtime.model.verification.BUDGET_RULES`):

- ``paired`` (the default): a format is refused for an accuracy loss only when the loss is larger than the
  budget **and** the paired 95% interval of the change lies wholly below zero, i.e. the images it broke
  outnumber the ones it fixed by more than chance explains (the exact conditional interval behind McNemar's
  test). A difference of one image is never enough: with 852 held-out images one image is 0.12 points, more
  than the fp16 budget of 0.1. Agreement with PyTorch (at least ``min_agreement`` percent) counts *decided*
  images only: those whose PyTorch margin (:func:`tledge_runtime.answers.decision.margins`) is larger than the
  format's own numerical noise, the 95th percentile of how far it moved the margins of the same images.
  A borderline image flipping is what rounding does; a decided image flipping is a changed model. A format
  whose noise is larger than half of PyTorch's margins has no decided majority and is refused outright.
- ``point``: the point estimates against the budget (what tledge did before; kept to re-judge old reports and
  for the simulation in ``benchmarks/gate_simulation.py``).

Every function here is pure: numbers in, numbers or sentences out.
"""

from __future__ import annotations

import math

import numpy as np

from tledge_runtime.model.answers import score_bound
from tledge_runtime.model.verification import Verification

CONFIDENCE = 0.95  # of the paired interval of an accuracy change
NOISE_QUANTILE = 0.95  # a format's numerical noise: this quantile of how far it moves PyTorch's margins
MIN_DECIDED = 0.5  # at least this fraction of the images must be decided (margin above the noise)


def paired_interval(to_correct: int, to_wrong: int, images: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact paired interval of an accuracy change, in points: ``(c - b) / n`` with ``c`` images fixed and ``b``
    broken among ``n``. Conditional on the ``m = b + c`` discordant images, ``c ~ Binomial(m, pi)``; the
    Clopper-Pearson interval of ``pi`` maps to ``m * (2 pi - 1) / n``. No discordant image: ``(0, 0)``."""
    m = to_correct + to_wrong
    if m == 0 or images == 0:
        return 0.0, 0.0
    alpha = 1.0 - confidence
    low = 0.0 if to_correct == 0 else _solve(lambda p: _tail_at_least(to_correct, m, p) - alpha / 2)
    high = 1.0 if to_correct == m else _solve(lambda p: alpha / 2 - _tail_at_most(to_correct, m, p))
    scale = 100.0 * m / images
    return scale * (2 * low - 1), scale * (2 * high - 1)


def judge(v: Verification, logits_finite: bool) -> list[str]:
    """Each accuracy-budget check of ``v`` that fails, in words with its numbers (``v.budget.kind == "accuracy"``)."""
    if not logits_finite:
        return []  # already refused for NaN/inf; the numbers below would not mean anything
    if v.budget.rule == "point":
        return _point_failures(v)
    budget, failures = v.budget, []
    drop = -v.accuracy_delta_points
    low, high = v.accuracy_interval or (0.0, 0.0)
    f = v.flips
    if drop > budget.max_drop_points + 1e-9 and high < 0:
        failures.append(f"accuracy drop {drop:.2f} points > budget {budget.max_drop_points:g} ({100 * v.accuracy:.2f}% "
                        f"vs PyTorch {100 * v.accuracy_reference:.2f}%), and a real one: its paired 95% interval "
                        f"[{low:+.2f}, {high:+.2f}] lies below zero ({f.to_wrong} images right -> "
                        f"wrong, {f.to_correct} wrong -> right of {v.images}; McNemar p {v.mcnemar_p:.2g})")
    # Agreement counts decided images only; a format noisy enough to leave no decided majority cannot hide behind
    # that (every answer of a broken model would otherwise count as borderline).
    if budget.min_agreement > 0 and v.decided is not None and v.decided < MIN_DECIDED * v.images:
        failures.append(f"numerical noise: the model moves decision margins by up to {v.noise:.3g} logits, more "
                        f"than half of PyTorch's margins ({v.decided} of {v.images} images decided beyond it)")
    agree = v.agreement_decided
    if agree is not None and 100.0 * agree < budget.min_agreement - 1e-9:
        failures.append(f"agreement with PyTorch on decided images {100 * agree:.2f}% < {budget.min_agreement:g}% "
                        f"({v.flips_decided} of {v.decided} images PyTorch decided by more than the model's noise "
                        f"{v.noise:.3g} changed their answer; {v.flips_borderline} borderline changes not counted)")
    failures += _class_failures(v)
    return failures


def judge_unknown(v: Verification, scores: np.ndarray, reference: np.ndarray) -> list[str]:
    """The out-of-distribution output against PyTorch's: within the logits budget for fp32, and deciding
    "unknown" alike on at least ``min_agreement`` percent of the held-out and probe images for fp16 and int8."""
    budget = v.budget
    if budget.kind == "logits":
        limit = score_bound(budget.atol, budget.rtol, reference, v.unknown_threshold)
        over = np.abs(scores - reference) > limit
        scale = "|score|" if v.unknown_threshold is None else f"max(|score|, threshold {v.unknown_threshold:.4g})"
        return [f"ood_score differs from PyTorch's by up to {v.ood_max_abs_diff:.3g} ({int(over.sum())} of "
                f"{over.size} over {budget.atol:g} + {budget.rtol:g}*{scale})"] if over.any() else []
    if v.unknown_agreement is None or budget.min_agreement <= 0:
        return []
    # As for answers (judge): a score within the format's own noise of the threshold is borderline; "unknown"
    # must agree on the images whose PyTorch score is decided beyond that noise. Distances (always positive) are
    # compared as ratios: int8's feature errors move a far-away image's large distance by as much, relatively, as a
    # near one's, and an absolute noise would be set by the far-away images alone.
    threshold = v.unknown_threshold
    same = (scores >= threshold) == (reference >= threshold)
    positive = threshold > 0 and bool((reference > 0).all() and (scores > 0).all())
    at = (lambda x: np.log(x)) if positive else (lambda x: x)
    noise = float(np.quantile(np.abs(at(scores) - at(reference)), NOISE_QUANTILE))
    decided = np.abs(at(reference) - at(threshold)) > noise
    if decided.sum() < MIN_DECIDED * len(reference):
        said = f"a factor {np.exp(noise):.3g}" if positive else f"{noise:.3g}"
        return [f"ood_score noise: the model moves scores by up to {said}, leaving {int(decided.sum())} of "
                f"{len(reference)} images decided beyond it on either side of the threshold"]
    agree = float(same[decided].mean())
    if 100.0 * agree < budget.min_agreement - 1e-9:
        return [f"unknown decided unlike PyTorch on {int((~same[decided]).sum())} of {int(decided.sum())} decided "
                f"images (held-out and out-of-distribution probes; {int((~same[~decided]).sum())} borderline changes "
                f"not counted): agreement {100 * agree:.2f}% < {budget.min_agreement:g}%"]
    return []


def _class_failures(v: Verification) -> list[str]:
    limit = v.budget.max_class_drop_points
    if limit is None:
        return []
    out = []
    for c in v.per_class:
        low, high = paired_interval(c.to_correct, c.to_wrong, c.images)
        if -c.delta_points > limit + 1e-9 and high < 0:
            out.append(f"class {c.label!r} lost {-c.delta_points:.2f} points > budget {limit:g} ({100 * c.accuracy:.2f}%"
                       f" vs PyTorch {100 * c.accuracy_reference:.2f}% on its {c.images} images; paired 95% interval "
                       f"[{low:+.2f}, {high:+.2f}])")
    return out


def _point_failures(v: Verification) -> list[str]:
    """The rule before the paired one: point estimates against the budget, agreement over every image."""
    budget, n, failures = v.budget, v.images, []
    drop = -v.accuracy_delta_points
    if drop > budget.max_drop_points + 1e-9:
        failures.append(f"accuracy drop {drop:.2f} points > budget {budget.max_drop_points:g} "
                        f"({100 * v.accuracy:.2f}% vs PyTorch {100 * v.accuracy_reference:.2f}%, "
                        f"agreement {100 * v.agreement:.1f}%, {n} images)")
    if 100.0 * v.agreement < budget.min_agreement - 1e-9:
        f = v.flips
        failures.append(f"top-1 agreement with PyTorch {100 * v.agreement:.2f}% < {budget.min_agreement:g}% "
                        f"({f.total} of {n} images changed their answer: {f.to_wrong} right -> wrong, "
                        f"{f.to_correct} wrong -> right, {f.wrong_to_wrong} wrong -> other wrong)")
    worst = v.worst_class
    if budget.max_class_drop_points is not None and worst is not None \
            and -worst.delta_points > budget.max_class_drop_points + 1e-9:
        failures.append(f"class {worst.label!r} lost {-worst.delta_points:.2f} points > budget "
                        f"{budget.max_class_drop_points:g} ({100 * worst.accuracy:.2f}% vs PyTorch "
                        f"{100 * worst.accuracy_reference:.2f}% on its {worst.images} images)")
    return failures


def noise_and_decided(margin: np.ndarray, moved: np.ndarray) -> tuple[float, np.ndarray]:
    """The format's noise (the :data:`NOISE_QUANTILE` of how far it moved each margin) and which images PyTorch
    decided by more than it."""
    noise = float(np.quantile(moved, NOISE_QUANTILE)) if len(moved) else 0.0
    return noise, margin > noise


def _solve(f, lo: float = 0.0, hi: float = 1.0) -> float:
    """The root of an increasing ``f`` on [lo, hi] by bisection (60 halvings: below 1e-15)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _log_pmf(k: int, m: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == m else -math.inf
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * math.log(p) + (m - k) * math.log1p(-p)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top if top == -math.inf else top + math.log(sum(math.exp(x - top) for x in values))


def _tail_at_most(k: int, m: int, p: float) -> float:
    return math.exp(_logsumexp([_log_pmf(i, m, p) for i in range(k + 1)]))


def _tail_at_least(k: int, m: int, p: float) -> float:
    return math.exp(_logsumexp([_log_pmf(i, m, p) for i in range(k, m + 1)]))

