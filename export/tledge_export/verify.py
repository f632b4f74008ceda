"""Parity with PyTorch: every exported model against the PyTorch model, on the same held-out images.

Numbers per format: max and mean |Δlogit|, top-1 agreement, accuracy of each and the
accuracy difference in points. Budgets:

- fp32: every logit within ``atol + rtol * |logit|`` of PyTorch's, atol 1e-4, rtol 1e-4.
  Why a relative part: ONNX Runtime and PyTorch sum the products of each convolution in a
  different order, and float32 re-association error grows with the magnitude of the sum;
  1e-4 is ~800 float32 ulps. 1e-5 was tried first and failed on a CI machine whose CPU
  picks other kernels (an EfficientNet-Lite0 at 32 px: 2.6e-4 at a logit of -6.6, 100%
  agreement), while every real export bug seen (wrong op, wrong preprocessing, a dropped layer) moves
  logits by 1e-2 or more.
- fp16, int8: the accuracy drop against PyTorch, in points (fp16 0.1, int8 ``--budget``).

Accuracy deltas are signed, model minus PyTorch: a negative delta is a drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

FP32_ATOL = 1e-4
FP32_RTOL = 1e-4


@dataclass(frozen=True)
class Budget:
    """What a format must meet: ``kind="logits"`` (atol/rtol) or ``kind="accuracy"`` (max drop in points)."""

    kind: str
    atol: float = 0.0
    rtol: float = 0.0
    max_drop_points: float = 0.0
    # Top-1 agreement with PyTorch, percent. Accuracy alone can hide errors that cancel out
    # (as many images fixed as broken); agreement counts every image that changed its answer.
    min_agreement: float = 0.0

    @classmethod
    def logits(cls, atol: float = FP32_ATOL, rtol: float = FP32_RTOL) -> Budget:
        return cls("logits", atol=atol, rtol=rtol)

    @classmethod
    def accuracy(cls, max_drop_points: float, min_agreement: float = 0.0) -> Budget:
        return cls("accuracy", max_drop_points=max_drop_points, min_agreement=min_agreement)

    def describe(self) -> str:
        if self.kind == "logits":
            return f"|Δlogit| <= {self.atol:g} + {self.rtol:g}*|logit|"
        agree = f", agree >= {self.min_agreement:g}%" if self.min_agreement else ""
        return f"drop <= {self.max_drop_points:g} pt{agree}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "logits":
            return {"kind": "logits", "atol": self.atol, "rtol": self.rtol}
        return {"kind": "accuracy", "max_drop_points": self.max_drop_points, "min_agreement": self.min_agreement}


@dataclass(frozen=True)
class Parity:
    """One model's agreement with PyTorch on ``images`` held-out images, and whether it is within budget."""

    images: int
    max_abs_diff: Optional[float]  # None when the model produced NaN/inf
    mean_abs_diff: Optional[float]
    agreement: float  # fraction of images where both pick the same class
    accuracy_reference: float  # PyTorch's accuracy on the same images
    accuracy: float
    budget: Budget
    passed: bool
    failures: tuple[str, ...] = ()  # each failed check in words, with its numbers
    backend: str = ""  # what ran the model, e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_delta_points(self) -> float:
        return 100.0 * (self.accuracy - self.accuracy_reference)

    def to_dict(self) -> dict[str, Any]:
        """The ``verification`` document stored in the model's metadata and in report.json."""
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        d["failures"] = list(self.failures)
        d["accuracy_delta_points"] = round(self.accuracy_delta_points, 4)
        for key in ("agreement", "accuracy_reference", "accuracy"):
            d[key] = round(d[key], 6)
        extra = d.pop("extra")
        return {**d, **extra}


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, budget: Budget, *,
            backend: str = "", extra: Optional[dict[str, Any]] = None) -> Parity:
    """Parity of ``logits`` (the exported model) with ``reference`` (PyTorch) on images labelled ``labels``."""
    logits = np.asarray(logits, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if logits.shape != reference.shape:
        raise ValueError(f"logits of shape {logits.shape} cannot be compared with PyTorch's {reference.shape}")
    n = len(labels)
    finite = bool(np.isfinite(logits).all())
    diff = np.abs(logits - reference)
    pred, ref_pred = logits.argmax(1), reference.argmax(1)
    accuracy, accuracy_ref = float((pred == labels).mean()), float((ref_pred == labels).mean())
    agreement = float((pred == ref_pred).mean())
    failures: list[str] = []
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
    drop = 100.0 * (accuracy_ref - accuracy)
    if budget.kind == "accuracy" and drop > budget.max_drop_points + 1e-9:
        failures.append(f"accuracy drop {drop:.2f} points > budget {budget.max_drop_points:g} "
                        f"({100 * accuracy:.2f}% vs PyTorch {100 * accuracy_ref:.2f}%, "
                        f"agreement {100 * agreement:.1f}%, {n} images)")
    if budget.kind == "accuracy" and 100.0 * agreement < budget.min_agreement - 1e-9:
        failures.append(f"top-1 agreement with PyTorch {100 * agreement:.2f}% < {budget.min_agreement:g}% "
                        f"({int(round((1 - agreement) * n))} of {n} images changed their answer)")
    return Parity(images=n, max_abs_diff=float(diff.max()) if finite else None,
                  mean_abs_diff=float(diff.mean()) if finite else None, agreement=agreement,
                  accuracy_reference=accuracy_ref, accuracy=accuracy, budget=budget, passed=not failures,
                  failures=tuple(failures), backend=backend, extra=dict(extra or {}))


def torch_logits(model, x: np.ndarray, *, chunk: int = 32) -> np.ndarray:
    """PyTorch's fp32 logits for normalized NCHW ``x``, on the CPU: the reference every export is held to."""
    import torch

    model = model.eval().float().cpu()
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32))).numpy())
    return np.concatenate(outs).astype(np.float32)


COLUMNS = ("format", "file", "MB", "max|Δlogit|", "mean|Δlogit|", "agree %", "PyTorch %", "acc %", "Δ pt",
           "budget", "status")


def table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with :data:`COLUMNS`; every row is already formatted."""
    cells = [list(COLUMNS)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def row(fmt: str, file: str, size_bytes: Optional[int], parity: Optional[Parity], status: str) -> list[str]:
    """One table row; numbers a format does not have (e.g. unavailable engines) are '-'."""
    if parity is None:
        return [fmt, file or "-", _mb(size_bytes), "-", "-", "-", "-", "-", "-", "-", status]
    p = parity
    return [fmt, file or "-", _mb(size_bytes), _num(p.max_abs_diff), _num(p.mean_abs_diff), f"{100 * p.agreement:.1f}",
            f"{100 * p.accuracy_reference:.2f}", f"{100 * p.accuracy:.2f}", f"{p.accuracy_delta_points:+.2f}",
            p.budget.describe(), status]


def _num(v: Optional[float]) -> str:
    return "nan" if v is None else f"{v:.2e}"


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"
