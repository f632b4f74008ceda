"""``--operating-point CLASS:recall=0.95``: the decision threshold of a binary task, chosen on held-out data.

Accuracy hides what an inspection line cares about: a model that misses 40% of the defective parts can still be
"86% accurate". An operating point chooses ``CLASS`` whenever its probability reaches a threshold, picked on the
validation split for a recall target (the highest threshold that still reaches it: the best precision at that
recall) or a precision target (the lowest threshold that reaches it: the best recall at that precision). The
threshold travels in the exported model (:class:`tledge_runtime.model.answers.OperatingPoint`); export
verification, the benchmark and the device all decide with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from tledge.errors import ConfigError
from tledge_runtime.model.answers import OperatingPoint, parse_target

_HINT = "write it as CLASS:recall=0.95 or CLASS:precision=0.9 (a target strictly between 0 and 1)"


@dataclass(frozen=True)
class Spec:
    """A parsed ``--operating-point``: the class, ``recall`` or ``precision``, and the target fraction."""

    label: str
    kind: str
    target: float

    @property
    def text(self) -> str:
        return f"{self.kind}={self.target:g}"


def parse_spec(text: str) -> Spec:
    """``"defective:recall=0.95"`` -> :class:`Spec`; a usage error names what is wrong."""
    label, sep, rest = str(text).rpartition(":")
    target = parse_target(rest) if sep else None
    if not label or target is None:
        raise ConfigError(f"--operating-point {text!r} is not CLASS:recall=R or CLASS:precision=P", hint=_HINT)
    return Spec(label, target[0], target[1])


def check_spec(spec: Spec, classes: Sequence[str]) -> None:
    """Refuse, before any training, an operating point this dataset cannot have."""
    if len(classes) != 2:
        raise ConfigError(f"--operating-point needs a task with two classes, this one has {len(classes)}",
                          hint="leave it out; multi-class models answer with the most probable class")
    if spec.label not in classes:
        raise ConfigError(f"--operating-point names class {spec.label!r}, the classes are {', '.join(classes)}",
                          hint=f"use one of {', '.join(classes)}")


def choose(spec: Spec, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
           where: str) -> tuple[Optional[OperatingPoint], str]:
    """The threshold on ``probs[:, spec.label]`` that meets ``spec`` on these held-out images (``labels``),
    and a sentence of what it gives there; ``(None, why)`` when no threshold meets it."""
    c = list(classes).index(spec.label)
    p, positive = np.asarray(probs, dtype=np.float64)[:, c], np.asarray(labels) == c
    if positive.sum() == 0:
        return None, f"{where} has no image of {spec.label!r} to choose a threshold on"
    candidates = np.unique(p)  # every distinct score is a threshold that changes the decision
    recall = np.array([(p[positive] >= t).mean() for t in candidates])
    precision = np.array([positive[p >= t].mean() for t in candidates])
    ok = (recall if spec.kind == "recall" else precision) >= spec.target - 1e-12
    if not ok.any():
        best = (recall if spec.kind == "recall" else precision).max()
        return None, f"no threshold reaches {spec.kind} {spec.target:g} on {where} (best {100 * best:.1f}%)"
    # recall falls as the threshold rises: take the highest that keeps it; precision rises: the lowest that reaches it
    i = int(np.flatnonzero(ok)[-1] if spec.kind == "recall" else np.flatnonzero(ok)[0])
    threshold = _between(candidates, i)
    measured = (f"{where}, {len(p)} images: recall {100 * recall[i]:.1f}%, precision {100 * precision[i]:.1f}% "
                f"of {spec.label}")
    return OperatingPoint(spec.label, threshold, spec.text, measured), measured


def _between(candidates: np.ndarray, i: int) -> float:
    """A threshold that makes exactly the decisions of ``candidates[i]`` on these images, away from any one score
    (half-way down to the next lower score), clipped into (0, 1)."""
    below = candidates[i - 1] if i > 0 else 0.0
    t = (candidates[i] + below) / 2
    return float(min(max(t, 1e-6), 1 - 1e-6))
