"""What the runtime answers for one image (:class:`Prediction`), and the one place a model's ``answers`` turn
graph outputs into it (:class:`Answerer`): calibrated probabilities, the decided class, the conformal set and
"unknown". Classifier, serve and the video loop answer through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from tledge_runtime.answers.conformal import prediction_sets, unknown
from tledge_runtime.answers.decision import decide, probabilities
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.meta import ModelMeta


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the decided class (label, index in the model's output, calibrated probability), the
    prediction set (``candidates``, most probable first; None when the model carries no conformal part) and
    whether the image looks like nothing the model was trained on (``unknown``, from ``ood_score``; None when the
    model carries no out-of-distribution output)."""

    label: str
    index: int
    score: float
    candidates: Optional[tuple[str, ...]] = None
    unknown: Optional[bool] = None
    ood_score: Optional[float] = None

    @property
    def unsure(self) -> bool:
        """More than one class (or none) cannot be ruled out at the model's coverage: route to a person."""
        return self.candidates is not None and len(self.candidates) != 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "index": self.index, "score": self.score}
        if self.candidates is not None:
            d["candidates"] = list(self.candidates)
        if self.unknown is not None:
            d["unknown"], d["ood_score"] = self.unknown, self.ood_score
        return d


class Answerer:
    """One model's rule from graph outputs to :class:`Prediction` (its metadata's ``answers``, or the plain top
    class of a softmax for models without them)."""

    def __init__(self, meta: ModelMeta):
        self.labels = meta.labels
        self.answers = meta.answers if meta.answers is not None else Answers()
        self.logits = meta.output.kind == "logits"

    def probabilities(self, out: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from the graph's main output (a graph that outputs probabilities: as they are)."""
        return probabilities(out, self.answers.temperature) if self.logits else np.asarray(out, dtype=np.float64)

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return decide(probs, self.labels, self.answers.operating_point)

    def predictions(self, probs: np.ndarray, ood: Optional[np.ndarray] = None) -> list[Prediction]:
        """The answer of every row of ``probs`` (and of its out-of-distribution score, when there is one)."""
        probs = np.asarray(probs, dtype=np.float64)
        best = self.decide(probs)
        a = self.answers
        sets = prediction_sets(probs, a.conformal) if a.conformal is not None else None
        flagged = unknown(ood, a.ood) if (a.ood is not None and ood is not None) else None
        out = []
        for i, (row, c) in enumerate(zip(probs, best)):
            out.append(Prediction(
                label=self.labels[int(c)], index=int(c), score=float(row[int(c)]),
                candidates=None if sets is None else tuple(self.labels[int(j)] for j in sets[i]),
                unknown=None if flagged is None else bool(flagged[i]),
                ood_score=None if flagged is None else float(ood[i])))
        return out
