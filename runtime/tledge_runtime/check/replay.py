"""``tledge-runtime check``: replay a model's own reference set on this device and say what held.

Stages, each compared with what the exporting machine recorded (:mod:`tledge_runtime.model.reference_set`):

- ``decode``: the decoded picture (this device's Pillow and libjpeg);
- ``resize``: the model-size picture after resize/crop;
- ``normalize``: the normalized tensor;
- ``numerics``, per backend: the model's logits on this device's tensor against PyTorch's, within the
  model's own budget: every logit within atol + rtol*|logit| for an fp32 model; for fp16 and int8 the
  same top-1 class and no logit further from PyTorch than the reference set's tolerance (twice what
  the model itself measured on these references with onnxruntime's CPU at export, at least 0.05).

The preprocessing stages do not depend on the backend and run once. Everything passes: exit 0;
anything differs: :class:`~tledge_runtime.errors.CheckFailed` (exit 1) with a table of what differed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tledge_runtime.check.trace import Trace, trace
from tledge_runtime.errors import CheckFailed, MetadataError, TledgeError
from tledge_runtime.model.answers import score_bound
from tledge_runtime.model.meta import ModelMeta
from tledge_runtime.model.reference_set import ReferenceSet

log = logging.getLogger("tledge_runtime")

STAGES = {"decode": "decoded", "resize": "resized", "normalize": "normalized"}  # stage -> its fingerprint
# Backends that compute below fp32 whatever the model's precision, and the logit tolerance that is their own
# budget: bfloat16 keeps 8 bits of mantissa (~0.4% relative), so logits of a few units move by up to ~0.1.
REDUCED_PRECISION = {"openvino-bf16": 0.25}
MIN_ACCURACY_TOLERANCE = 0.05  # logits, for fp16/int8 models whose reference set records no tolerance


@dataclass(frozen=True)
class Stage:
    name: str  # decode | resize | normalize | numerics
    ok: bool
    detail: str  # what differed, with numbers; or what was compared


@dataclass(frozen=True)
class BackendCheck:
    """The numerics stage on one backend."""

    backend: str
    ok: bool
    detail: str
    agreement: Optional[float] = None  # fraction of references with PyTorch's top-1 class
    max_abs_diff: Optional[float] = None
    seconds: float = 0.0


@dataclass
class CheckReport:
    model: str
    references: int  # items replayed (images + synthetic)
    images: int
    preprocessing: list[Stage]
    backends: list[BackendCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.preprocessing) and bool(self.backends) and all(b.ok for b in self.backends)

    def failures(self) -> list[str]:
        return ([f"{s.name}: {s.detail}" for s in self.preprocessing if not s.ok]
                + [f"numerics on {b.backend}: {b.detail}" for b in self.backends if not b.ok])

    def raise_for_failures(self) -> None:
        if not self.ok:
            raise CheckFailed(f"{self.model}: the reference check failed ({'; '.join(self.failures())})",
                              hint="see `tledge-runtime check` for the table; re-export on this device's versions, "
                                   "or run the model on a backend that passes")

    def table(self) -> str:
        rows = [(s.name, "-", "ok" if s.ok else "DIFFERS", s.detail) for s in self.preprocessing]
        rows += [("numerics", b.backend, "ok" if b.ok else "DIFFERS", b.detail) for b in self.backends]
        widths = [max(len(r[i]) for r in rows + [("stage", "backend", "result", "")]) for i in range(3)]
        lines = [f"{'stage':<{widths[0]}}  {'backend':<{widths[1]}}  {'result':<{widths[2]}}  detail"]
        lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
        verdict = "all stages hold" if self.ok else f"{len(self.failures())} stage(s) differ"
        return "\n".join(lines + [f"{self.model}: {self.references} references ({self.images} images): {verdict}"])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ok": self.ok, "references": self.references, "images": self.images,
                "preprocessing": [asdict(s) for s in self.preprocessing],
                "backends": [asdict(b) for b in self.backends]}


def reference_set_of(meta: ModelMeta, where: str) -> ReferenceSet:
    if meta.reference_set is None or not meta.reference_set.items:
        raise MetadataError(f"{where}: the model carries no reference set",
                            hint="re-export it with this tledge (`tledge export` embeds one in every model)")
    return meta.reference_set


def trace_references(meta: ModelMeta, where: str) -> tuple[list[Trace], list[Stage]]:
    """This device's preprocessing of every reference, and the three preprocessing stages' verdicts."""
    refs = reference_set_of(meta, where)
    traces = [trace(item, meta.preprocess) for item in refs.items]
    stages, alive = [], list(range(len(traces)))  # a stage is judged on the items whose earlier stages held
    for name, key in STAGES.items():
        differ = [i for i in alive if getattr(traces[i].fingerprint, key) != getattr(refs.items[i].fingerprint, key)]
        detail = f"{len(alive) - len(differ)} of {len(alive)} match the export's fingerprints"
        if differ and name == "decode":
            i = differ[0]
            detail += (f"; e.g. item {i}: mean levels {list(traces[i].fingerprint.decoded_mean)} here, "
                       f"{list(refs.items[i].fingerprint.decoded_mean)} at export (another Pillow or libjpeg?)")
        elif differ:
            detail += f"; items {differ[:8]} differ after identical earlier stages"
        stages.append(Stage(name, not differ, detail))
        alive = [i for i in alive if i not in differ]
    return traces, stages


def check_numerics(meta: ModelMeta, backend: str, run_graph: Callable[[np.ndarray], Any],
                   traces: Sequence[Trace]) -> BackendCheck:
    """Run a loaded model (``run_graph``: graph input batch -> outputs, e.g. ``Classifier.run_graph``, or -> (outputs,
    out-of-distribution scores), e.g. ``Classifier.run_graph_scored``) on the traced tensors and compare its
    outputs with the stored PyTorch logits (and scores, for a model that carries them)."""
    refs = reference_set_of(meta, backend)
    t0 = time.perf_counter()
    x = np.concatenate([t.tensor_u8[None] if meta.input.dtype == "uint8" else t.tensor for t in traces])
    if meta.input.layout == "NHWC" and meta.input.dtype != "uint8":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    try:
        got, scores = _outputs(run_graph(x))
    except TledgeError as e:
        return BackendCheck(backend, False, f"could not run: {e.message}")
    ref = np.array([item.logits for item in refs.items], dtype=np.float64)
    if meta.output.kind == "probabilities":
        e = np.exp(ref - ref.max(axis=1, keepdims=True))
        ref = e / e.sum(axis=1, keepdims=True)
    seconds = time.perf_counter() - t0
    if got.shape != ref.shape:
        return BackendCheck(backend, False, f"outputs {got.shape}, references {ref.shape}", seconds=seconds)
    verdict = _judge(backend, meta, got, ref, seconds)
    problem = _judge_scores(meta, refs, scores)
    if problem:
        return BackendCheck(backend, False, f"{verdict.detail}; {problem}", verdict.agreement, verdict.max_abs_diff,
                            verdict.seconds)
    return verdict


def _outputs(result: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    if isinstance(result, tuple):
        out, scores = result
        return np.asarray(out, dtype=np.float64), None if scores is None else np.asarray(scores, np.float64).reshape(-1)
    return np.asarray(result, dtype=np.float64), None


def _judge_scores(meta: ModelMeta, refs: Any, scores: Optional[np.ndarray]) -> str:
    """What is wrong with the out-of-distribution scores, or "" (also when the model or the references have none)."""
    stored = [item.ood_score for item in refs.items]
    if scores is None or any(v is None for v in stored):
        return ""
    ref = np.asarray(stored, dtype=np.float64)
    diff = np.abs(scores - ref)
    v = meta.verification
    if v is not None and v.budget.kind == "logits":
        ood = meta.answers.ood if meta.answers is not None else None
        limit = score_bound(v.budget.atol, v.budget.rtol, ref, None if ood is None else ood.threshold)
        return "" if (diff <= limit).all() else f"ood_score differs from PyTorch's by up to {diff.max():.3g}"
    tol = refs.ood_tolerance if refs.ood_tolerance is not None else MIN_ACCURACY_TOLERANCE
    return "" if diff.max() <= tol else f"ood_score differs from PyTorch's by {diff.max():.3g} > {tol:.3g}"


def _judge(backend: str, meta: ModelMeta, got: np.ndarray, ref: np.ndarray, seconds: float) -> BackendCheck:
    diff = np.abs(got - ref)
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    v = meta.verification
    problems = []
    if backend in REDUCED_PRECISION:
        # A backend that computes below the model's precision has its own budget, never the fp32 one.
        tol = max(REDUCED_PRECISION[backend], meta.reference_set.tolerance or 0.0) if meta.reference_set else \
            REDUCED_PRECISION[backend]
        rule = f"{backend}'s own budget: same top-1, |Δlogit| <= {tol:.3g}"
        if diff.max() > tol:
            problems.append(f"max |Δlogit| {diff.max():.3g} > {tol:.3g}")
    elif v is not None and v.budget.kind == "logits":
        limit = v.budget.atol + v.budget.rtol * np.abs(ref)
        rule = f"|Δlogit| <= {v.budget.atol:g} + {v.budget.rtol:g}*|logit|"
        if (diff > limit).any():
            problems.append(f"{int((diff > limit).sum())} of {diff.size} logits outside {rule}")
    else:
        tol = meta.reference_set.tolerance if meta.reference_set and meta.reference_set.tolerance is not None \
            else MIN_ACCURACY_TOLERANCE
        rule = f"same top-1, |Δlogit| <= {tol:.3g}"
        if diff.max() > tol:
            problems.append(f"max |Δlogit| {diff.max():.3g} > {tol:.3g}")
    if agree < 1.0:
        problems.append(f"top-1 differs from PyTorch on {int(round((1 - agree) * len(ref)))} of {len(ref)}")
    detail = "; ".join(problems) if problems else f"{rule}: max |Δlogit| {diff.max():.3g}, top-1 {100 * agree:.0f}%"
    return BackendCheck(backend, not problems, detail, agree, float(diff.max()), round(seconds, 4))
