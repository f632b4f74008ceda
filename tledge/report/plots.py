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


_BACKEND_COLOURS = {"pytorch-eager": "tab:gray", "ort-cpu": "tab:blue", "openvino": "tab:purple",
                    "ort-cuda": "tab:olive", "ort-tensorrt": "tab:green", "tensorrt": "tab:cyan"}
_PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}


def pareto_front(rows: Sequence[Any]) -> list[Any]:
    """The rows no other row beats on both latency and accuracy, fastest first."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r.p50_ms, -r.accuracy)):
        if r.accuracy > best:
            front.append(r)
            best = r.accuracy
    return front


def plot_pareto(rows: Sequence[Any], path: Path, title: str = "accuracy vs latency (batch 1)") -> Path:
    """Accuracy against p50 latency: colour = backend, marker = precision, Pareto front ringed and joined.

    A point is on the front when no other point is both faster and at least as accurate. Rows
    over budget get a red edge. Labels of points that sit close together are stacked, not overlaid
    (formats often share one accuracy exactly).
    """
    plt = _pyplot()
    pts = sorted((r for r in rows if r.p50_ms is not None and r.accuracy is not None), key=lambda r: r.p50_ms)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    accs = [100 * r.accuracy for r in pts]
    if accs:  # fixed limits first: stacked labels are placed in data units
        pad = max((max(accs) - min(accs)) * 0.3, 0.15)
        ax.set_ylim(min(accs) - pad, max(accs) + pad * 0.6)
    for r in pts:
        ax.scatter(r.p50_ms, 100 * r.accuracy, color=_BACKEND_COLOURS.get(r.backend, "tab:brown"),
                   marker=_PRECISION_MARKERS.get(r.precision, "D"), s=55, zorder=3,
                   edgecolors="tab:red" if r.status == "over budget" else "none", linewidths=1.5)
    _label_points(ax, pts, accs)
    front = pareto_front(pts)
    if front:
        ax.scatter([r.p50_ms for r in front], [100 * r.accuracy for r in front], s=170, facecolors="none",
                   edgecolors="tab:green", linewidths=1.5, zorder=2)
        if len(front) > 1:
            ax.step([r.p50_ms for r in front], [100 * r.accuracy for r in front], where="post", color="tab:green",
                    alpha=0.5)
    if pts:
        ax.legend(handles=_legend_keys(pts), loc="best", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 2, 5, 10 ms rather than 2x10^0
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.margins(x=0.12)
    ax.set_xlabel("p50 latency, ms (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    absent = [r for r in rows if r.p50_ms is None or r.accuracy is None]
    if absent:  # a format the plot cannot show is named, with why: two points must not look like the whole story
        lines = [f"not plotted: {r.name} ({r.backend if r.backend != '-' else r.precision}): "
                 + _shorten(f"{r.status}" + (f", {r.reason}" if r.reason else ""), 95) for r in absent]
        fig.text(0.01, 0.01, "\n".join(lines), fontsize=7.5, color="tab:red", va="bottom", ha="left")
        fig.tight_layout(rect=(0, 0.025 * (len(lines) + 1), 1, 1))
    else:
        fig.tight_layout()
    return _save(fig, path)


def _shorten(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _label_points(ax: Any, pts: Sequence[Any], accs: Sequence[float]) -> None:
    """Points at the same accuracy and a similar latency form a cluster: the first is labelled beside
    its point, the others in a list under it, each joined to its point by a thin line."""
    near_y = max((max(accs) - min(accs)) * 0.06, 0.05) if accs else 0.05
    step = (ax.get_ylim()[1] - ax.get_ylim()[0]) * 0.045
    anchors: list[tuple[float, float, int]] = []  # (latency, accuracy, labels stacked) per cluster
    for r, acc in zip(pts, accs):
        text = f"{r.precision} {r.backend}"
        i = next((i for i, (x, y, _) in enumerate(anchors) if abs(y - acc) <= near_y and r.p50_ms / x < 1.6), None)
        if i is None:
            anchors.append((r.p50_ms, acc, 0))
            ax.annotate(text, (r.p50_ms, acc), textcoords="offset points", xytext=(7, 5), fontsize=8)
            continue
        x, y, n = anchors[i]
        anchors[i] = (x, y, n + 1)
        ax.annotate(text, (r.p50_ms, acc), xytext=(x, y - step * (n + 1.2)), fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55", shrinkA=0, shrinkB=4))


def _legend_keys(pts: Sequence[Any]) -> list[Any]:
    """One key per backend (colour), per precision (marker), the front and, if any, over budget."""
    from matplotlib.lines import Line2D

    def key(label: str, **style: Any) -> Line2D:
        return Line2D([], [], linestyle="none", label=label, **{"markersize": 7, **style})

    keys = [key(b, marker="o", color=_BACKEND_COLOURS.get(b, "tab:brown"))
            for b in dict.fromkeys(r.backend for r in pts)]
    keys += [key(p, marker=_PRECISION_MARKERS.get(p, "D"), color="black")
             for p in dict.fromkeys(r.precision for r in pts)]
    keys.append(key("Pareto front", marker="o", markerfacecolor="none", markeredgecolor="tab:green", markersize=12))
    if any(r.status == "over budget" for r in pts):
        keys.append(key("over budget", marker="o", markerfacecolor="none", markeredgecolor="tab:red"))
    return keys


def plot_reliability(curves: dict[str, list[tuple[float, float, int]]], path: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy against mean top probability per bin, one line per curve (before and after
    calibration), the diagonal where they would be perfectly calibrated; marker size = images in the bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (name, points), colour in zip(curves.items(), ("tab:red", "tab:blue", "tab:green")):
        if points:
            conf, acc, n = zip(*points)
            ax.plot(conf, acc, marker="o", color=colour, label=name)
            ax.scatter(conf, acc, s=[10 + 200 * k / max(n) for k in n], color=colour, alpha=0.3)
    ax.set_xlabel("mean top probability (bin)")
    ax.set_ylabel("accuracy (bin)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability: " + title if title else "reliability")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
