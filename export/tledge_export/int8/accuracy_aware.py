"""Accuracy-aware int8: keep the most sensitive nodes in float until the accuracy budget holds.

1. Quantize everything; verify. Within budget: done, nothing stays in float.
2. Rank the quantized nodes by sensitivity (:mod:`tledge_export.int8.sensitivity`).
3. Keep the worst 1, 2, 4, 8, ... in float (re-quantizing with the cached calibration) until
   the budget holds or :attr:`Search.limit` nodes are in float; then bisect back down between
   the last failing and the first passing count, so as few nodes as possible pay for float.

The limit defaults to a quarter of the quantized nodes: past that an int8 model has lost
most of its speed advantage, and the fp16 export is the better answer. Every attempt is
recorded with its numbers and its CPU latency (batch 1, ONNX Runtime), which says what
the nodes kept in float cost in speed.

The budget is judged on the held-out verification images, as the export's own check is;
the ranking uses only calibration (training) images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import onnx

from tledge_runtime.model.verification import Verification

log = logging.getLogger(__name__)

LIMIT_FRACTION = 0.25


@dataclass(frozen=True)
class Attempt:
    float_nodes: tuple[str, ...]
    parity: Verification
    latency_ms: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        return {"float_nodes": list(self.float_nodes), "passed": self.parity.passed,
                "accuracy_delta_points": round(self.parity.accuracy_delta_points, 4),
                "agreement": round(self.parity.agreement, 6), "max_abs_diff": self.parity.max_abs_diff,
                "cpu_latency_ms_batch1": None if self.latency_ms is None else round(self.latency_ms, 3)}


@dataclass
class Search:
    """The model chosen and how it was found."""

    model: onnx.ModelProto
    parity: Verification
    float_nodes: tuple[str, ...]
    attempts: list[Attempt] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)
    limit: int = 0

    @property
    def met(self) -> bool:
        return self.parity.passed

    def to_dict(self) -> dict[str, Any]:
        base = self.attempts[0].latency_ms if self.attempts else None
        final = next((a.latency_ms for a in self.attempts if a.float_nodes == self.float_nodes), None)
        return {"budget_met": self.met, "float_nodes": list(self.float_nodes), "limit": self.limit,
                "attempts": [a.to_dict() for a in self.attempts],
                "ranking": [{"node": n, "noise_to_signal": s} for n, s in self.ranking[:max(self.limit, 8)]],
                "cpu_latency_ms_batch1": {"all_int8": _r(base), "chosen": _r(final)}}


def search(quantize: Callable[[Sequence[str]], onnx.ModelProto],
           evaluate: Callable[[onnx.ModelProto], tuple[Verification, Optional[float]]],
           rank: Callable[[onnx.ModelProto], list[tuple[str, float]]], *,
           max_float_nodes: Optional[int] = None, progress: Optional[Callable[..., Any]] = None,
           stage: str = "post-training int8") -> Search:
    """Run the search. ``quantize(float_nodes)`` makes a QDQ model, ``evaluate(model)`` gives its parity
    and latency, ``rank(model)`` orders its nodes; ``max_float_nodes`` 0 turns the search off. ``stage`` names
    the search in its log lines (post-training int8, or the int8 of quantization-aware training)."""
    base = quantize(())
    parity, latency = evaluate(base)
    attempts = [Attempt((), parity, latency)]
    result = Search(base, parity, (), attempts)
    log.info("%s, every node int8: %s -> %s", stage, parity.summary(),
             "within budget" if parity.passed else "over budget: " + "; ".join(parity.failures))
    if parity.passed or max_float_nodes == 0:
        return result
    result.ranking = ranking = [(n, s) for n, s in rank(base) if s > 0]
    auto = max(1, math.ceil(LIMIT_FRACTION * len(ranking)))
    result.limit = limit = min(len(ranking), auto if max_float_nodes is None else max_float_nodes)
    if limit == 0:
        return result
    log.info("%s: keeping up to %d of %d quantized nodes in float, most sensitive first", stage, limit, len(ranking))
    names = [n for n, _ in ranking]
    bar = progress(total=None, desc=f"{stage}, nodes in float", unit="try") if progress else None
    tried: dict[int, Attempt] = {}
    models: dict[int, onnx.ModelProto] = {}

    def attempt(k: int) -> bool:
        model = quantize(names[:k])
        p, ms = evaluate(model)
        tried[k] = a = Attempt(tuple(names[:k]), p, ms)
        models[k] = model
        attempts.append(a)
        log.info("%s, %d node(s) in float: %s -> %s", stage, k, p.summary(),
                 "within budget" if p.passed else "over budget")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(float_nodes=k, delta=f"{p.accuracy_delta_points:+.2f}")
        return p.passed

    try:
        _double_then_bisect(attempt, tried, limit)
    finally:
        if bar is not None:
            bar.close()
    passing = [c for c, a in tried.items() if a.parity.passed]
    if passing:
        best = min(passing)
    else:  # report the closest miss, the all-int8 model included: fewest failed checks, then most answers
        models[0], tried[0] = base, attempts[0]  # kept, then highest accuracy, then fewest float nodes
        best = min(tried, key=lambda c: (len(tried[c].parity.failures), -tried[c].parity.agreement,
                                         -tried[c].parity.accuracy, c))
    result.model, result.parity, result.float_nodes = models[best], tried[best].parity, tried[best].float_nodes
    return result


def _double_then_bisect(attempt: Callable[[int], bool], tried: dict[int, Attempt], limit: int) -> None:
    """Try 1, 2, 4, ... float nodes until one passes or ``limit`` is reached; then bisect down to the fewest
    that pass (assuming more float nodes never hurt)."""
    k, failing = 1, 0
    while not attempt(k):
        failing = k
        if k >= limit:
            break
        k = min(2 * k, limit)
    passing = [c for c, a in tried.items() if a.parity.passed]
    if passing:
        low, high = failing + 1, min(passing) - 1
        while low <= high:
            mid = (low + high) // 2
            if attempt(mid):
                high = mid - 1
            else:
                low = mid + 1


def _r(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 3)
