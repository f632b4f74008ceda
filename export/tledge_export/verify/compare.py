"""Parity with PyTorch: every exported model against the PyTorch model, on the same held-out images.

Two public functions, usable on any model:

- :func:`compare`: logits of a model against PyTorch's -> a typed
  :class:`~tledge_runtime.model.verification.Verification` with every failure in words (a pure function);
- :func:`verify_onnx`: run an ONNX file (or proto) with ONNX Runtime on a :class:`Reference` and compare.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from tledge_export.verify.gate import judge, noise_and_decided, paired_interval
from tledge_runtime.answers.decision import margin_change, margins
from tledge_runtime.image.preprocess import Normalizer
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.meta import Preprocess
from tledge_runtime.model.verification import Budget, ClassDelta, Flips, Verification, mcnemar_p

__all__ = ["Budget", "Reference", "Verification", "compare", "row", "table", "torch_logits", "verify_onnx", "verify_session"]


@dataclass(frozen=True)
class Reference:
    """The held-out images every export is verified on, and PyTorch's answers on them.

    ``images``: uint8 NHWC at the model input (what a baked model takes); ``x``: the same, normalized
    NCHW float32 (what the other models take); ``logits``: PyTorch's fp32 logits on ``x``.
    """

    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    x: np.ndarray
    classes: tuple[str, ...]
    name: str = "PyTorch fp32 CPU"  # what produced ``logits``
    data: str = "held-out images"  # what the images are
    answers: Optional[Answers] = None  # how answers are decided (operating point, temperature), as on the device

    @classmethod
    def from_model(cls, model: Any, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
                   classes: Sequence[str], data: str = "held-out images",
                   answers: Optional[Answers] = None) -> Reference:
        """PyTorch's fp32 CPU logits of ``model`` on ``images`` (uint8 NHWC at the model input)."""
        import torch

        images = np.ascontiguousarray(images)
        x = Normalizer(preprocess)(images)
        name = f"PyTorch {torch.__version__.split('+')[0]} fp32 CPU"
        return cls(images, np.asarray(labels), torch_logits(model, x), x, tuple(classes), name, data, answers)

    def inputs_for(self, elem_dtype: np.dtype) -> np.ndarray:
        """The images as a graph whose input has ``elem_dtype`` takes them: uint8 NHWC, float16 or float32 NCHW."""
        if elem_dtype == np.uint8:
            return self.images
        return self.x.astype(np.float16) if elem_dtype == np.float16 else self.x

    def compare(self, logits: np.ndarray, budget: Budget, *, backend: str = "") -> Verification:
        """:func:`compare` of ``logits`` on these images, labelled with this reference."""
        v = compare(logits, self.logits, self.labels, budget, backend=backend, classes=self.classes,
                    answers=self.answers)
        return v.with_(reference=self.name, data=self.data)


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


def verify_onnx(model: Union[str, Path, bytes, Any], reference: Reference, budget: Budget, *,
                fixed_batch: Optional[int] = None, threads: Optional[int] = None) -> Verification:
    """Run an ONNX model (a file, its bytes, or an ``onnx.ModelProto``) with ONNX Runtime on the CPU over
    ``reference`` and compare it with PyTorch under ``budget``."""
    from tledge_runtime.backends.loader import ort_session

    data = model if isinstance(model, (str, Path, bytes)) else model.SerializeToString()
    return verify_session(ort_session(data, threads=threads), reference, budget, fixed_batch=fixed_batch)


def verify_session(sess: Any, reference: Reference, budget: Budget, *,
                   fixed_batch: Optional[int] = None) -> Verification:
    """:func:`verify_onnx` on an onnxruntime session that is already open."""
    import onnxruntime

    from tledge_export.graph_run import run

    logits = run(sess, reference.inputs_for(_input_dtype(sess)), fixed_batch=fixed_batch)[0]
    return reference.compare(logits, budget, backend=f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider")


def _input_dtype(sess: Any) -> np.dtype:
    kind = sess.get_inputs()[0].type
    return np.dtype({"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(kind, np.float32))


def torch_logits(model, x: np.ndarray, *, chunk: int = 32) -> np.ndarray:
    """PyTorch's fp32 logits for normalized NCHW ``x``, on the CPU: the reference every export is held to."""
    import torch

    model = model.eval().float().cpu()
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32))).numpy())
    return np.concatenate(outs).astype(np.float32)


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
