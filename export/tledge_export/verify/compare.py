"""Parity with PyTorch: every exported model against the PyTorch model, on the same held-out images.

:func:`compare`: logits of a model against PyTorch's -> a typed
:class:`~tledge_runtime.model.verification.Verification` with every failure in words (a pure function);
:func:`compare_scores` adds the out-of-distribution output. Running a model to get its logits is
:mod:`tledge_export.verify.run` (``verify_onnx`` on any ONNX file); what the budgets accept is
:mod:`tledge_export.verify.gate`.

Numbers per model: max and mean |Δlogit|, top-1 agreement, accuracy of each and the accuracy
difference in points, images that changed class in each direction, per-class accuracy deltas and
McNemar's exact test. Budgets (defaults in :mod:`tledge_export.config`):

- fp32: every logit within ``atol + rtol * |logit|`` of PyTorch's, atol 1e-4, rtol 1e-4.
  Why a relative part: ONNX Runtime and PyTorch sum the products of each convolution in a
  different order, and float32 re-association error grows with the magnitude of the sum;
  1e-4 is ~800 float32 ulps. 1e-5 was tried first and failed on a CI machine whose CPU
  picks other kernels (an EfficientNet-Lite0 at 32 px: 2.6e-4 at a logit of -6.6, 100%
  agreement), while every real export bug seen (wrong op, wrong preprocessing, a dropped layer) moves
  logits by 1e-2 or more.
- fp16, int8: the accuracy drop against PyTorch, in points (fp16 0.1, int8 ``--budget``), top-1
  agreement (``--min-agreement``) and, if asked, the drop of the worst class (``--max-class-drop``).

Accuracy deltas are signed, model minus PyTorch: a negative delta is a drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from tledge_export.verify.gate import judge, judge_unknown, noise_and_decided, paired_interval
from tledge_runtime.answers.decision import margin_change, margins
from tledge_runtime.model.answers import OOD, Answers
from tledge_runtime.model.verification import Budget, ClassDelta, Flips, Verification, mcnemar_p

__all__ = ["Budget", "Verification", "compare", "compare_scores", "row", "table"]


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, budget: Budget, *,
            backend: str = "", classes: Optional[Sequence[str]] = None, answers: Optional[Answers] = None) -> Verification:
    """Parity of ``logits`` (the exported model) with ``reference`` (PyTorch) on images labelled ``labels``, both
    decided the way ``answers`` says (an operating point, a temperature; default: the top class)."""
    logits = np.asarray(logits, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with PyTorch's {reference.shape}")
    n = len(labels)
    names = list(classes) if classes is not None else [str(i) for i in range(reference.shape[1])]
    point = answers.operating_point if answers is not None else None
    temperature = answers.temperature if answers is not None else 1.0
    finite = bool(np.isfinite(logits).all())
    diff = np.abs(logits - reference)
    ref_pred, margin = margins(reference, names, point, temperature)
    pred = margins(np.nan_to_num(logits), names, point, temperature)[0]
    right, ref_right = pred == labels, ref_pred == labels
    to_correct, to_wrong = right & ~ref_right, ~right & ref_right
    flips = Flips(to_correct=int(to_correct.sum()), to_wrong=int(to_wrong.sum()),
                  wrong_to_wrong=int((~right & ~ref_right & (pred != ref_pred)).sum()))
    per_class = tuple(ClassDelta(names[c], int((labels == c).sum()), float(ref_right[labels == c].mean()),
                                 float(right[labels == c].mean()), int(to_wrong[labels == c].sum()),
                                 int(to_correct[labels == c].sum()))
                      for c in range(len(names)) if (labels == c).any())
    noise, decided = noise_and_decided(margin, margin_change(reference, np.nan_to_num(logits), ref_pred))
    v = Verification(images=n, max_abs_diff=float(diff.max()) if finite else None,
                     mean_abs_diff=float(diff.mean()) if finite else None, agreement=float((pred == ref_pred).mean()),
                     accuracy_reference=float(ref_right.mean()), accuracy=float(right.mean()), budget=budget,
                     passed=True, backend=backend, flips=flips, mcnemar_p=mcnemar_p(flips.to_correct, flips.to_wrong),
                     per_class=per_class, accuracy_interval=paired_interval(flips.to_correct, flips.to_wrong, n),
                     noise=noise if finite else None, decided=int(decided.sum()),
                     flips_decided=int(((pred != ref_pred) & decided).sum()),
                     decision="top class" if point is None else point.describe())
    failures = _failures(v, logits, reference, diff, finite)
    return v.with_(passed=not failures, failures=tuple(failures))


def compare_scores(v: Verification, scores: np.ndarray, reference: np.ndarray, ood: Optional[OOD]) -> Verification:
    """``v`` with the out-of-distribution output judged: its largest difference from PyTorch's scores, and (with
    the model's threshold) on how many images both decide "unknown" alike."""
    scores, reference = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    finite = bool(np.isfinite(scores).all())
    diff = float(np.abs(scores - reference).max()) if finite else None
    agree = None
    if ood is not None and finite:
        agree = float(((scores >= ood.threshold) == (reference >= ood.threshold)).mean())
    v = v.with_(ood_max_abs_diff=diff, unknown_agreement=agree, unknown_images=int(len(scores)),
                unknown_threshold=None if ood is None else ood.threshold)
    failures = judge_unknown(v, scores, reference) if finite else [f"non-finite ood_score for "
                                                                   f"{int((~np.isfinite(scores)).sum())} images"]
    return v.with_(passed=v.passed and not failures, failures=v.failures + tuple(failures))


def _failures(v: Verification, logits: np.ndarray, reference: np.ndarray, diff: np.ndarray, finite: bool) -> list[str]:
    """Each check of ``v.budget`` that does not hold, in words with its numbers."""
    budget, n, failures = v.budget, v.images, []
    if not finite:
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        failures.append(f"non-finite logits (NaN/inf) for {bad} of {n} images")
    if budget.kind == "logits" and finite:
        limit = budget.atol + budget.rtol * np.abs(reference)
        over = diff > limit
        if over.any():
            i = np.unravel_index(int(np.argmax(diff - limit)), diff.shape)
            failures.append(f"max |Δlogit| {diff.max():.3g} > {budget.atol:g} + {budget.rtol:g}*|logit| "
                            f"({int(over.sum())} of {over.size} logits over; worst {diff[i]:.3g} at a logit of "
                            f"{reference[i]:.3g})")
    if budget.kind == "accuracy":
        failures += judge(v, finite)
    return failures


# "agree % (decided)": every image, then the images PyTorch decided by more than the format's noise;
# "changed -/+ (borderline)": answers that became wrong / right, and how many of all changes were borderline;
# "Δ pt [95%]": the accuracy change and its paired interval.
COLUMNS = ("format", "file", "MB", "max|Δlogit|", "agree % (decided)", "changed -/+ (borderline)", "worst class Δ",
           "PyTorch %", "acc %", "Δ pt [95%]", "p", "budget", "status")


def table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with :data:`COLUMNS`; every row is already formatted."""
    cells = [list(COLUMNS)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def row(fmt: str, file: str, size_bytes: Optional[int], v: Optional[Verification], status: str) -> list[str]:
    """One table row; numbers a format does not have (e.g. unavailable engines) are '-'."""
    if v is None:
        return [fmt, file or "-", _mb(size_bytes)] + ["-"] * (len(COLUMNS) - 4) + [status]
    worst = v.worst_class
    decided = "" if v.agreement_decided is None else f" ({100 * v.agreement_decided:.1f})"
    borderline = "" if v.flips_borderline is None else f" ({v.flips_borderline})"
    interval = "" if v.accuracy_interval is None else " [{:+.2f},{:+.2f}]".format(*v.accuracy_interval)
    return [fmt, file or "-", _mb(size_bytes), _num(v.max_abs_diff), f"{100 * v.agreement:.1f}{decided}",
            f"{v.flips.to_wrong}/{v.flips.to_correct}{borderline}", "-" if worst is None else f"{worst.delta_points:+.2f}",
            f"{100 * v.accuracy_reference:.2f}", f"{100 * v.accuracy:.2f}", f"{v.accuracy_delta_points:+.2f}{interval}",
            "-" if v.mcnemar_p is None else f"{v.mcnemar_p:.2g}", v.budget.describe(), status]


def _num(v: Optional[float]) -> str:
    return "nan" if v is None else f"{v:.2e}"


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"
