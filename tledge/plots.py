"""PNG plots people would rather look at than read: training curves and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tledge_runtime.fileio import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and val, with the head-only warm-up shaded."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        scale = 100.0 if key == "acc" else 1.0
        ax.plot(epochs, [h[f"train_{key}"] * scale for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] * scale for h in history], "o-", label="val")
        frozen = [h["epoch"] for h in history if h.get("phase") == "head"]
        if frozen:
            ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="0.9", label="head only (frozen backbone)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Confusion matrix with counts and row-normalised shading."""
    import numpy as np

    plt = _pyplot()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=classes)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[Any], path: Path, title: str = "accuracy vs latency (batch 1)") -> Path:
    """Accuracy against p50 latency, one labelled point per format/backend, the Pareto front drawn.

    A point is on the front when no other point is both faster and at least as accurate.
    """
    plt = _pyplot()
    pts = [r for r in rows if r.p50_ms is not None and r.accuracy is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in pts:
        colour = {"ok": "tab:blue", "over budget": "tab:red"}.get(r.status, "tab:gray")
        ax.scatter(r.p50_ms, 100 * r.accuracy, color=colour, s=40, zorder=3)
        ax.annotate(f"{r.name}\n{r.backend}", (r.p50_ms, 100 * r.accuracy), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    front, best = [], -1.0
    for r in sorted(pts, key=lambda r: (r.p50_ms, -r.accuracy)):
        if r.accuracy > best:
            front.append(r)
            best = r.accuracy
    if len(front) > 1:
        ax.step([r.p50_ms for r in front], [100 * r.accuracy for r in front], where="post", color="tab:green",
                alpha=0.6, label="Pareto front")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, 5, 10 ms rather than 2x10^0
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("p50 latency, ms (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return _save(fig, path)
