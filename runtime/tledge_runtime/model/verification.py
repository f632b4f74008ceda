"""What an exported model was verified against, typed: the ``verification`` part of the model-artifact contract.

``tledge export`` compares every model with the PyTorch model it came from on held-out images and
stores the result, a :class:`Verification`, inside the model file. Its :class:`Budget` is what the model
had to meet; ``tledge-runtime check`` holds the device's own run of the model to the same budget.

Besides the averages (logit error, top-1 agreement, accuracy delta) it keeps what averages hide:
how many images changed class in each direction (:class:`Flips`), the accuracy delta of every class
(:class:`ClassDelta`, the worst class first in :attr:`Verification.worst_class`), McNemar's exact
test of the accuracy delta (:attr:`Verification.mcnemar_p`: the probability of at least this imbalance
between fixed and broken images if the model were as accurate as PyTorch) with its paired 95% interval
(:attr:`Verification.accuracy_interval`), and which changed answers were *decided* images (PyTorch's margin
above the format's numerical noise, :attr:`Verification.noise`) rather than borderline ones.

Written by :meth:`Verification.to_dict` and read by :meth:`Verification.from_dict` (bounded and typed,
a :class:`~tledge_runtime.errors.MetadataError` for anything else), in one place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from tledge_runtime.errors import MetadataError
from tledge_runtime.model.bounds import build

BUDGET_KINDS = ("logits", "accuracy")
# How an accuracy budget is judged. "paired" (tledge >= 0.2): a format is refused for a loss over the budget
# only when the paired 95% interval of the change lies below zero, and agreement counts decided images only.
# "point": the point estimates against the budget (files verified before the paired rule; still readable).
BUDGET_RULES = ("paired", "point")
MAX_TEXT = 4096  # characters of one failure message or description
MAX_ITEMS = 100_000  # failures, classes


@dataclass(frozen=True)
class Budget:
    """What a model must meet against PyTorch.

    ``kind="logits"``: every logit within ``atol + rtol * |logit|`` (fp32).
    ``kind="accuracy"``: accuracy drop at most ``max_drop_points``; top-1 agreement at least
    ``min_agreement`` percent; with ``max_class_drop_points``, no class may lose more than that.
    """

    kind: str
    atol: float = 0.0
    rtol: float = 0.0
    max_drop_points: float = 0.0
    # Top-1 agreement with PyTorch, percent. Accuracy alone can hide errors that cancel out
    # (as many images fixed as broken); agreement counts every image that changed its answer.
    min_agreement: float = 0.0
    max_class_drop_points: Optional[float] = None  # worst-class budget; None: not checked
    rule: str = "paired"  # see BUDGET_RULES

    def __post_init__(self) -> None:
        _need(self.kind in BUDGET_KINDS, f"budget kind must be one of {BUDGET_KINDS}")
        _need(self.rule in BUDGET_RULES, f"budget rule must be one of {BUDGET_RULES}")
        for name in ("atol", "rtol", "max_drop_points", "min_agreement"):
            _need(_number(getattr(self, name)) and getattr(self, name) >= 0, f"budget {name} must be a number >= 0")
        _need(self.max_class_drop_points is None or (_number(self.max_class_drop_points)
                                                     and self.max_class_drop_points >= 0),
              "budget max_class_drop_points must be null or a number >= 0")

    @classmethod
    def logits(cls, atol: float, rtol: float) -> Budget:
        return cls("logits", atol=atol, rtol=rtol)

    @classmethod
    def accuracy(cls, max_drop_points: float, min_agreement: float = 0.0,
                 max_class_drop_points: Optional[float] = None) -> Budget:
        return cls("accuracy", max_drop_points=max_drop_points, min_agreement=min_agreement,
                   max_class_drop_points=max_class_drop_points)

    def describe(self) -> str:
        if self.kind == "logits":
            return f"|Δlogit| <= {self.atol:g} + {self.rtol:g}*|logit|"
        decided = " of decided" if self.rule == "paired" else ""
        agree = f", agree >= {self.min_agreement:g}%{decided}" if self.min_agreement else ""
        worst = f", class drop <= {self.max_class_drop_points:g} pt" if self.max_class_drop_points is not None else ""
        return f"drop <= {self.max_drop_points:g} pt{agree}{worst}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "logits":
            return {"kind": "logits", "atol": self.atol, "rtol": self.rtol}
        d = {"kind": "accuracy", "max_drop_points": self.max_drop_points, "min_agreement": self.min_agreement,
             "rule": self.rule}
        if self.max_class_drop_points is not None:
            d["max_class_drop_points"] = self.max_class_drop_points
        return d


@dataclass(frozen=True)
class Flips:
    """Images whose top-1 class differs from PyTorch's: ``to_correct`` (PyTorch wrong, model right),
    ``to_wrong`` (PyTorch right, model wrong), ``wrong_to_wrong`` (both wrong, different classes)."""

    to_correct: int = 0
    to_wrong: int = 0
    wrong_to_wrong: int = 0

    @property
    def total(self) -> int:
        return self.to_correct + self.to_wrong + self.wrong_to_wrong


@dataclass(frozen=True)
class ClassDelta:
    """One class: its held-out images, PyTorch's and the model's accuracy on them, the delta in points, and its
    images that changed answer each way (what its paired interval is computed from)."""

    label: str
    images: int
    accuracy_reference: float
    accuracy: float
    to_wrong: int = 0
    to_correct: int = 0

    @property
    def delta_points(self) -> float:
        return 100.0 * (self.accuracy - self.accuracy_reference)


@dataclass(frozen=True)
class Verification:
    """One model against PyTorch on ``images`` held-out images, and whether it met its budget."""

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
    reference: str = ""  # what it was compared with, e.g. "PyTorch 2.14.1 fp32 CPU"
    data: str = ""  # which images, e.g. "held-out val+test split of runs/exp"
    measured: str = ""  # when, ISO 8601 UTC
    flips: Flips = field(default_factory=Flips)
    mcnemar_p: Optional[float] = None  # exact two-sided McNemar p-value of the accuracy delta
    per_class: tuple[ClassDelta, ...] = ()  # in label order
    # Paired 95% interval of the accuracy delta, in points (exact, from the images that changed answer).
    accuracy_interval: Optional[tuple[float, float]] = None
    noise: Optional[float] = None  # how far this model moves decision margins, logit units (95th percentile)
    decided: Optional[int] = None  # images whose PyTorch margin is larger than ``noise``
    flips_decided: Optional[int] = None  # of the changed answers, those of decided images
    decision: str = ""  # how an answer was decided: "top class" or the operating point
    # The out-of-distribution output (models that carry one): its largest |difference| from PyTorch's, and the
    # fraction of the held-out images plus the export's out-of-distribution probes on which both say "unknown"
    # alike (of ``unknown_images``).
    ood_max_abs_diff: Optional[float] = None
    unknown_agreement: Optional[float] = None
    unknown_images: Optional[int] = None
    unknown_threshold: Optional[float] = None  # the threshold those decisions were taken at

    @property
    def agreement_decided(self) -> Optional[float]:
        """Agreement with PyTorch on the decided images (what a "paired" budget holds to its minimum)."""
        if self.decided is None or self.flips_decided is None:
            return None
        return 1.0 - self.flips_decided / self.decided if self.decided else 1.0

    @property
    def flips_borderline(self) -> Optional[int]:
        return None if self.flips_decided is None else self.flips.total - self.flips_decided

    def summary(self) -> str:
        """The numbers of an accuracy verification in one line, for people: what changed, and by how much."""
        f, agree = self.flips, f"agreement {100 * self.agreement:.2f}%"
        if self.decided == 0:
            agree += " (no image decided beyond the model's noise)"
        elif self.agreement_decided is not None:
            agree += f" ({100 * self.agreement_decided:.2f}% of {self.decided} decided images)"
        changed = f"{f.total} of {self.images} answers changed ({f.to_wrong} to wrong, {f.to_correct} to right"
        changed += f", {self.flips_borderline} borderline)" if self.flips_borderline is not None else ")"
        delta = f"accuracy {self.accuracy_delta_points:+.2f} points"
        if self.accuracy_interval is not None:
            delta += " [95%: {:+.2f}, {:+.2f}]".format(*self.accuracy_interval)
        unknown = "" if self.unknown_agreement is None else \
            f", unknown decided alike on {100 * self.unknown_agreement:.2f}% of {self.unknown_images} images"
        return f"{agree}, {changed}, {delta}{unknown}"

    @property
    def accuracy_delta_points(self) -> float:
        return 100.0 * (self.accuracy - self.accuracy_reference)

    @property
    def worst_class(self) -> Optional[ClassDelta]:
        """The class that lost the most accuracy (first in label order on ties), or None."""
        return min(self.per_class, key=lambda c: c.delta_points, default=None)

    def with_(self, **changes: Any) -> Verification:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = self.budget.to_dict()
        d["failures"] = list(self.failures)
        d["per_class"] = [{**asdict(c), "delta_points": round(c.delta_points, 4)} for c in self.per_class]
        d["accuracy_delta_points"] = round(self.accuracy_delta_points, 4)  # derived; for people reading the JSON
        if self.accuracy_interval is not None:
            d["accuracy_interval"] = [round(v, 4) for v in self.accuracy_interval]
        for key in ("agreement", "accuracy_reference", "accuracy"):
            d[key] = round(d[key], 6)
        if self.unknown_agreement is not None:
            d["unknown_agreement"] = round(self.unknown_agreement, 6)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Verification:
        """Read a stored verification (bounded: it comes from a model file)."""
        _need(isinstance(d, dict), "metadata field 'verification' must be an object")
        known = {f.name for f in fields(cls)} | {"accuracy_delta_points"}
        unknown = sorted(set(d) - known)
        _need(not unknown, f"unknown verification field(s) {unknown[:5]}")
        body = {k: v for k, v in d.items() if k != "accuracy_delta_points"}
        try:
            stored = body["budget"]
            if isinstance(stored, dict) and stored.get("kind") == "accuracy" and "rule" not in stored:  # verified before
                # the paired rule existed: its pass/fail was judged on the point estimates
                stored = {**stored, "rule": "point"}
            body["budget"] = build(Budget, stored, "verification budget")
            body["flips"] = build(Flips, body.get("flips", {}), "verification flips")
            body["per_class"] = tuple(_class_delta(c) for c in _list(body.get("per_class", []), "per_class"))
            body["failures"] = tuple(_text(f, "failure") for f in _list(body.get("failures", []), "failures"))
            if body.get("accuracy_interval") is not None:
                body["accuracy_interval"] = _interval(body["accuracy_interval"])
            v = cls(**body)
        except (KeyError, TypeError) as e:
            raise MetadataError(f"malformed verification metadata: {e}",
                                hint="re-export the model with `tledge export`") from None
        v._validate()
        return v

    def _validate(self) -> None:
        _need(_count(self.images), "verification images must be a non-negative integer")
        for name in ("agreement", "accuracy_reference", "accuracy"):
            _need(_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, f"verification {name} must be in 0..1")
        for name in ("max_abs_diff", "mean_abs_diff", "mcnemar_p", "ood_max_abs_diff"):
            value = getattr(self, name)
            _need(value is None or (_number(value) and value >= 0), f"verification {name} must be null or >= 0")
        _need(isinstance(self.passed, bool), "verification passed must be true or false")
        for name in ("backend", "reference", "data", "measured"):
            _text(getattr(self, name), name)
        _need(all(_count(getattr(self.flips, f.name)) for f in fields(Flips)), "verification flips must be counts")
        _need(self.unknown_threshold is None or _number(self.unknown_threshold),
              "verification unknown_threshold must be null or a number")
        _need(self.unknown_agreement is None or (_number(self.unknown_agreement) and 0 <= self.unknown_agreement <= 1),
              "verification unknown_agreement must be null or in 0..1")
        for name in ("decided", "flips_decided", "unknown_images"):
            _need(getattr(self, name) is None or _count(getattr(self, name)), f"verification {name} must be a count")
        _need(self.noise is None or (_number(self.noise) and self.noise >= 0), "verification noise must be >= 0")
        _text(self.decision, "decision")


def mcnemar_p(to_correct: int, to_wrong: int) -> float:
    """Exact two-sided McNemar test: P(an imbalance at least this large | both models equally accurate).

    Under the null hypothesis each of the ``n = to_correct + to_wrong`` discordant images is fixed or
    broken with probability 1/2, so the smaller count is Binomial(n, 1/2); integer arithmetic keeps the
    sum exact for any n.
    """
    n = to_correct + to_wrong
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(to_correct, to_wrong) + 1))
    return min(1.0, (2 * tail) / (1 << n))


def _interval(v: Any) -> tuple[float, float]:
    _need(isinstance(v, list) and len(v) == 2 and all(_number(x) and -100 <= x <= 100 for x in v) and v[0] <= v[1],
          "verification accuracy_interval must be [low, high] in points, low <= high")
    return (float(v[0]), float(v[1]))


def _class_delta(c: Any) -> ClassDelta:
    c = dict(_obj(c, "per_class entry"))
    c.pop("delta_points", None)  # derived, written for people reading the JSON
    delta = build(ClassDelta, c, "verification per_class entry")
    _need(isinstance(delta.label, str) and len(delta.label) <= MAX_TEXT and _count(delta.images)
          and _count(delta.to_wrong) and _count(delta.to_correct)
          and all(_number(v) and 0 <= v <= 1 for v in (delta.accuracy, delta.accuracy_reference)),
          "malformed per_class verification entry")
    return delta


def _obj(v: Any, what: str) -> dict[str, Any]:
    _need(isinstance(v, dict), f"verification {what} must be an object")
    return v


def _list(v: Any, what: str) -> list[Any]:
    _need(isinstance(v, list) and len(v) <= MAX_ITEMS, f"verification {what} must be a list of at most {MAX_ITEMS}")
    return v


def _text(v: Any, what: str) -> str:
    _need(isinstance(v, str) and len(v) <= MAX_TEXT, f"verification {what} must be a string of at most {MAX_TEXT}")
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**12


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise MetadataError(message, hint="re-export the model with `tledge export`")
