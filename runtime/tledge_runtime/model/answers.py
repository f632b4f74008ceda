"""What an answer means, as the model file states it: the ``answers`` part of the metadata contract.

- ``temperature``: probabilities are ``softmax(logits / temperature)`` (post-hoc calibration; 1.0: none);
- ``operating_point``: a binary task's decision threshold (:class:`OperatingPoint`), or None for the top class;
- ``conformal``: the prediction set's threshold and the coverage it was calibrated for (:class:`Conformal`);
- ``ood``: the "unknown" rule: which graph output holds the out-of-distribution score, and the threshold
  (:class:`OOD`);
- ``unfitted``: each part that could not be fitted, and why (too few held-out images...): never a silent
  default.

The arithmetic that applies them is :mod:`tledge_runtime.answers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tledge_runtime.model.bounds import build, check, check_label, is_number, is_str

TARGETS = ("recall", "precision")


@dataclass(frozen=True)
class OperatingPoint:
    """Choose ``label`` when its probability is at least ``threshold`` (binary tasks), else the other class.

    ``target``: what the threshold was chosen for, e.g. ``"recall=0.95"``; ``measured``: where and with what
    result, e.g. ``"val split, 262 images: recall 95.1%, precision 61.3%"``.
    """

    label: str
    threshold: float
    target: str
    measured: str = ""

    def __post_init__(self) -> None:
        check(isinstance(self.label, str), "operating_point label must be a string")
        check_label(0, self.label)
        check(is_number(self.threshold) and 0.0 < self.threshold < 1.0,
              "operating_point threshold must be a probability strictly between 0 and 1")
        check(is_str(self.target, 64) and parse_target(self.target) is not None,
              "operating_point target must look like recall=0.95 or precision=0.9")
        check(is_str(self.measured, 1024), "operating_point measured must be a string of at most 1024 characters")

    def describe(self) -> str:
        return f"{self.label} when p({self.label}) >= {self.threshold:.4g} (chosen for {self.target})"


def parse_target(text: str) -> Optional[tuple[str, float]]:
    """``"recall=0.95"`` -> ``("recall", 0.95)``; None when it is not a target in (0, 1)."""
    kind, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        return None
    return (kind, number) if kind in TARGETS and 0.0 < number < 1.0 else None


SCORES = ("lac", "aps")  # conformal scores: 1 - p(true class); cumulative probability down to it
OOD_METHODS = ("mahalanobis", "knn", "energy", "msp")
MAX_NOTE_CHARS = 1024


@dataclass(frozen=True)
class Conformal:
    """Split conformal prediction: the set of an image holds every class whose ``score`` is at most
    ``threshold``, which held ``coverage`` of the true classes on ``images`` held-out images."""

    score: str
    coverage: float
    threshold: float
    images: int
    measured: str = ""

    def __post_init__(self) -> None:
        check(self.score in SCORES, f"conformal score must be one of {SCORES}")
        check(is_number(self.coverage) and 0.0 < self.coverage < 1.0, "conformal coverage must be in (0, 1)")
        check(is_number(self.threshold) and 0.0 <= self.threshold <= 1.0 + 1e-9, "conformal threshold must be in [0, 1]")
        check(isinstance(self.images, int) and not isinstance(self.images, bool) and 0 < self.images <= 10**9,
              "conformal images must be a positive integer")
        check(is_str(self.measured, MAX_NOTE_CHARS), "conformal measured must be a short string")


@dataclass(frozen=True)
class OOD:
    """Out-of-distribution: the graph output ``output`` is a score (higher: further from the training data); an
    image scoring at least ``threshold`` is "unknown". ``keep``: the fraction of held-out in-distribution images
    below the threshold when it was chosen."""

    method: str
    output: str
    threshold: float
    keep: float
    measured: str = ""

    def __post_init__(self) -> None:
        check(self.method in OOD_METHODS, f"ood method must be one of {OOD_METHODS}")
        check(is_str(self.output, 256) and self.output != "", "ood output must name a graph output")
        check(is_number(self.threshold), "ood threshold must be a finite number")
        check(is_number(self.keep) and 0.0 < self.keep < 1.0, "ood keep must be in (0, 1)")
        check(is_str(self.measured, MAX_NOTE_CHARS), "ood measured must be a short string")


@dataclass(frozen=True)
class Answers:
    """How the runtime turns the graph's outputs into the answer it reports."""

    temperature: float = 1.0
    operating_point: Optional[OperatingPoint] = None
    conformal: Optional[Conformal] = None
    ood: Optional[OOD] = None
    calibration: str = ""  # how the temperature was fitted, e.g. "val split, 197 images: NLL 0.41 -> 0.33"
    unfitted: tuple[str, ...] = ()  # "conformal: only 12 held-out images (at least 20 needed)", ...

    def __post_init__(self) -> None:
        check(is_number(self.temperature) and 0.01 <= self.temperature <= 100.0,
              "answers temperature must be a number in 0.01..100")
        for name, cls in (("operating_point", OperatingPoint), ("conformal", Conformal), ("ood", OOD)):
            check(getattr(self, name) is None or isinstance(getattr(self, name), cls),
                  f"answers {name} must be an object or null")
        check(is_str(self.calibration, MAX_NOTE_CHARS), "answers calibration must be a short string")
        check(isinstance(self.unfitted, (list, tuple)) and len(self.unfitted) <= 16
              and all(is_str(n, MAX_NOTE_CHARS) for n in self.unfitted), "answers unfitted must be a short list of notes")
        object.__setattr__(self, "unfitted", tuple(self.unfitted))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": self.temperature, "calibration": self.calibration,
                             "unfitted": list(self.unfitted)}
        for name in ("operating_point", "conformal", "ood"):
            if getattr(self, name) is not None:
                d[name] = dict(vars(getattr(self, name)))
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Answers:
        body = dict(d) if isinstance(d, dict) else d
        if isinstance(body, dict):
            for name, part in (("operating_point", OperatingPoint), ("conformal", Conformal), ("ood", OOD)):
                if body.get(name) is not None:
                    body[name] = build(part, body[name], f"answers {name}")
        return build(cls, body, "answers")


def score_bound(atol: float, rtol: float, reference: Any, threshold: Optional[float]) -> Any:
    """How far an fp32 model's ``ood_score`` may be from PyTorch's (``reference``, an array): the logits' bound, with
    the relative part taken of the larger of the score and the threshold it is compared with. A squared distance
    near zero moves by as much as one near the threshold when the features move by float32 noise (twice the
    distance times the noise, after whitening), and only its side of the threshold is ever used."""
    scale = abs(reference) if threshold is None else abs(reference).clip(min=abs(threshold))
    return atol + rtol * scale
