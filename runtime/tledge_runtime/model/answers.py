"""What an answer means, as the model file states it: the ``answers`` part of the metadata contract.

- ``temperature``: probabilities are ``softmax(logits / temperature)`` (post-hoc calibration; 1.0: none);
- ``operating_point``: a binary task's decision threshold (:class:`OperatingPoint`), or None for the top class.

The arithmetic that applies them is :mod:`tledge_runtime.answers.decision`.
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


@dataclass(frozen=True)
class Answers:
    """How the runtime turns the graph's logits into the answer it reports."""

    temperature: float = 1.0
    operating_point: Optional[OperatingPoint] = None

    def __post_init__(self) -> None:
        check(is_number(self.temperature) and 0.01 <= self.temperature <= 100.0,
              "answers temperature must be a number in 0.01..100")
        check(self.operating_point is None or isinstance(self.operating_point, OperatingPoint),
              "answers operating_point must be an object or null")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": self.temperature}
        if self.operating_point is not None:
            d["operating_point"] = dict(vars(self.operating_point))
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Answers:
        body = dict(d) if isinstance(d, dict) else d
        if isinstance(body, dict) and body.get("operating_point") is not None:
            body["operating_point"] = build(OperatingPoint, body["operating_point"], "answers operating_point")
        return build(cls, body, "answers")
