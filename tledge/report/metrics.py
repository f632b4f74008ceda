"""Classification metrics in numpy: confusion matrix, per-class precision/recall/F1, a text report."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of images of true class ``i`` predicted as ``j``."""
    idx = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def report(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and their macro average, as plain data."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = cm.sum()
    per_class = {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, c in enumerate(classes)}
    present = support > 0
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "images": int(total),
        "per_class": per_class,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": cm.astype(np.int64).tolist(),
        "classes": list(classes),
    }


def format_report(r: dict[str, Any]) -> str:
    """The report as an aligned text table plus the confusion matrix."""
    classes = r["classes"]
    width = max(9, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for c in classes:
        m = r["per_class"][c]
        lines.append(f"{c:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lines.append(f"{'accuracy':<{width}}  {r['accuracy'] * 100:8.2f}%  on {r['images']} images, macro F1 {r['macro_f1']:.3f}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    cw = max(6, *(len(c) for c in classes))
    lines.append(" " * width + "  " + " ".join(f"{c[:cw]:>{cw}}" for c in classes))
    for c, row in zip(classes, r["confusion"]):
        lines.append(f"{c:<{width}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def class_rates(r: dict[str, Any]) -> str:
    """One line: each class's precision and recall (what accuracy hides on an unbalanced task)."""
    return "; ".join(f"{c} precision {100 * m['precision']:.1f}% recall {100 * m['recall']:.1f}%"
                     for c, m in r["per_class"].items())


def operating_point_lines(answers: dict[str, Any]) -> list[str]:
    """What the run's operating point is and gives on the test split (from metrics.json's ``answers``)."""
    point = answers.get("operating_point")
    if not point:
        return []
    if "refused" in point:
        return [f"operating point {point['asked']} not set: {point['refused']}"]
    lines = [f"operating point: {point['label']} when p({point['label']}) >= {point['threshold']:.4g}, chosen for "
             f"{point['target']} on the {point['measured']}"]
    at = answers.get("test_at_operating_point")
    if at:
        lines.append(f"test at the operating point: accuracy {100 * at['accuracy']:.2f}%; " + class_rates(at))
    return lines
