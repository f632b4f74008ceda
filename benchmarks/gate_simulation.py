"""The export gate's two rules on a real verification set: how often each refuses a model that changed k answers.

    python benchmarks/gate_simulation.py RUN_FOLDER [--reps 400] [--seed 0] [--max-fraction 0.03]
        [--json benchmarks/results/gate_simulation.json] [--plot benchmarks/results/gate_simulation.png]

RUN_FOLDER is a run that `tledge export --fp16 --int8` (or `tledge demo`) exported into RUN_FOLDER/export. The
verification set is rebuilt exactly as export builds it: the run's held-out val+test images decoded at the model
input (:mod:`tledge.exporting`), PyTorch's fp32 CPU logits on them
(:meth:`tledge_export.verify.compare.Reference.from_model`), and each exported file's logits with ONNX Runtime on
the CPU, fed as :func:`~tledge_export.verify.compare.verify_session` feeds it. The script first checks that this
set reproduces the verification stored in the export's report.json.

Then, for each k from 0 to ``--max-fraction`` of the set, ``--reps`` times (seeded): choose k images on which
the format agrees with PyTorch and change the format's answer on each (the top two logits swapped; with an
operating point, the score mirrored across its threshold), as a real change of the model would, and judge the
result with :func:`tledge_export.verify.compare.compare` under the old rule (``Budget(..., rule="point")``:
point estimates, agreement over every image) and the new one (``Budget.accuracy``: the paired interval, agreement
over decided images); fp16 with its budget (0.1 point) on the fp16 logits, int8 with its own (1.0) on the int8
logits, both at 99% agreement. The expected accuracy loss at each k is exact: the format's own loss plus k times
the mean change of a flip over the candidate images.

Output: a table, ``--json`` and ``--plot`` (refusal rate against k, with the k where the expected loss crosses each
budget; below it the expected loss itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tledge_export.verify.compare import compare
from tledge_runtime.answers.decision import margins
from tledge_runtime.model.answers import Answers
from tledge_runtime.model.verification import Budget, Verification

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"fp16": 0.1, "int8": 1.0}  # points: tledge_export.config.FP16_BUDGET and INT8_BUDGET
FILES = {"fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
MIN_AGREEMENT = 99.0  # percent, tledge_export.config.MIN_AGREEMENT


def rules(max_drop_points: float) -> dict[str, Budget]:
    """The old and the new rule at one accuracy budget and the default 99% agreement."""
    return {"old": Budget("accuracy", max_drop_points=max_drop_points, min_agreement=MIN_AGREEMENT, rule="point"),
            "new": Budget.accuracy(max_drop_points, MIN_AGREEMENT)}


@dataclass(frozen=True)
class Task:
    """A verification set and one format's logits on it: everything :func:`compare` needs."""

    reference: np.ndarray  # PyTorch's logits
    labels: np.ndarray
    logits: np.ndarray  # the format's logits
    classes: tuple[str, ...]
    answers: Optional[Answers] = None

    def decided(self, logits: np.ndarray) -> np.ndarray:
        """Each image's answer from ``logits``, decided as verification decides (top class or operating point)."""
        point = self.answers.operating_point if self.answers else None
        return margins(logits, self.classes, point, self.answers.temperature if self.answers else 1.0)[0]

    def judge(self, logits: np.ndarray, budget: Budget) -> Verification:
        return compare(logits, self.reference, self.labels, budget, classes=self.classes, answers=self.answers)


def flip(task: Task, logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``logits`` with the answer of each of ``rows`` changed by the smallest symmetric edit: the top two logits
    swapped (with an operating point: the two classes' score mirrored across its threshold)."""
    out = np.array(logits, dtype=np.float64, copy=True)
    point = task.answers.operating_point if task.answers else None
    if point is None:
        top2 = np.argsort(-out[rows], axis=1, kind="stable")[:, :2]
        first, second = top2[:, 0], top2[:, 1]
        a, b = out[rows, first].copy(), out[rows, second].copy()
        out[rows, first], out[rows, second] = b, a
    else:
        c = task.classes.index(point.label)
        shift = task.answers.temperature * np.log(point.threshold / (1 - point.threshold))
        score = out[rows, c] - out[rows, 1 - c] - shift  # >= 0: the point's class
        out[rows, c] -= 2 * score
    return out


def candidates(task: Task) -> np.ndarray:
    """Images whose answer a flip turns from PyTorch's into another one: those where the format agrees with
    PyTorch (flipping an image that already differs would undo a change, not add one)."""
    return np.flatnonzero(task.decided(task.logits) == task.decided(task.reference))


def flip_effects(task: Task) -> tuple[np.ndarray, float]:
    """Per candidate image, the change of the format's correct answers if that image alone is flipped (-1, 0 or
    +1), and the format's own accuracy change in points: what the expected loss at each k is made of."""
    rows = candidates(task)
    before = task.decided(task.logits)[rows] == task.labels[rows]
    after = task.decided(flip(task, task.logits, rows))[rows] == task.labels[rows]
    base = 100.0 * float(np.mean(task.decided(task.logits) == task.labels)
                         - np.mean(task.decided(task.reference) == task.labels))
    return after.astype(int) - before.astype(int), base


def simulate(task: Task, max_drop_points: float, ks: Sequence[int], reps: int = 400, seed: int = 0) -> dict[str, Any]:
    """Refusal rate of the old and the new rule at each k (``reps`` random sets of k flipped images per k, the
    same sets for both rules), the expected and the mean simulated accuracy loss, and why the new rule refused."""
    budgets = rules(max_drop_points)
    rows = candidates(task)
    effects, base = flip_effects(task)
    per_flip = 100.0 * float(effects.mean()) / len(task.labels)  # points per flipped image, expected
    out: dict[str, Any] = {"budget_points": max_drop_points, "images": len(task.labels), "candidates": len(rows),
                           "base_delta_points": round(base, 4), "points_per_flip": round(per_flip, 5), "k": [],
                           "expected_loss_points": [], "mean_loss_points": [], "old": [], "new": [],
                           "new_reasons": []}
    for k in ks:
        if k > len(rows):
            raise ValueError(f"k={k} is more than the {len(rows)} images the format agrees on")
        rng = np.random.default_rng([seed, k])
        refused = {"old": 0, "new": 0}
        reasons = {"accuracy": 0, "agreement": 0, "noise": 0}
        losses = []
        for _ in range(reps if k else 1):  # k = 0 has one outcome: the format as exported
            logits = flip(task, task.logits, rng.choice(rows, size=k, replace=False))
            old, new = (task.judge(logits, budgets[name]) for name in ("old", "new"))
            refused["old"] += not old.passed
            refused["new"] += not new.passed
            for reason in reasons:
                reasons[reason] += any(f.startswith(_PREFIX[reason]) for f in new.failures)
            losses.append(-new.accuracy_delta_points)
        n = reps if k else 1
        out["k"].append(int(k))
        out["expected_loss_points"].append(round(-(base + k * per_flip), 4) + 0.0)  # + 0.0: no "-0.00"
        out["mean_loss_points"].append(round(float(np.mean(losses)), 4))
        out["old"].append(refused["old"] / n)
        out["new"].append(refused["new"] / n)
        out["new_reasons"].append({r: c / n for r, c in reasons.items()})
    at = crossing(base, per_flip, max_drop_points)
    out["crossing_k"] = None if at is None else round(at, 3)
    return out


_PREFIX = {"accuracy": "accuracy drop", "agreement": "agreement with PyTorch on decided", "noise": "numerical noise"}


def crossing(base: float, per_flip: float, max_drop_points: float) -> Optional[float]:
    """The k (fractional) at which the expected loss ``-(base + k * per_flip)`` reaches the budget; None if never."""
    if -base > max_drop_points:
        return 0.0
    return None if per_flip >= 0 else (max_drop_points + base) / -per_flip


def verification_set(run: Path, workers: int = 2) -> tuple[Any, dict[str, np.ndarray], Optional[Answers]]:
    """The export's verification set of ``run``, rebuilt the way `tledge export` builds it, the logits of each
    exported fp16/int8 file on it (a refused format has no file and no entry), and how those files decide an answer
    (the ``answers`` in their metadata: what their verification used): ``(Reference, {format: logits}, answers)``."""
    from tledge.exporting import _held_out, _run_splits  # export's own steps: the same images, in the same order
    from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
    from tledge_runtime.backends.loader import read_meta

    try:  # the public name once verify/ is split into compare/gate/run (main after c706e23, issue 20)
        from tledge_export.verify import Reference
    except ImportError:  # before the split (this branch's base)
        from tledge_export.verify.compare import Reference

    ckpt = load_checkpoint(run / "best.pt")
    labels, prep = list(ckpt["labels"]), preprocess_of(ckpt)
    held = _held_out(_run_splits(run, labels), prep, run, workers)
    reference = Reference.from_model(model_from_checkpoint(ckpt), held.images, held.labels, prep, labels,
                                     data=f"held-out val+test split of {run.name}")
    files = {fmt: run / "export" / name for fmt, name in FILES.items() if (run / "export" / name).is_file()}
    answers = {fmt: read_meta(path).answers for fmt, path in files.items()}
    if len({repr(a) for a in answers.values()}) > 1:
        raise SystemExit(f"the exported files decide answers differently: {answers}")
    return reference, {fmt: file_logits(path, reference) for fmt, path in files.items()}, next(iter(answers.values()),
                                                                                               None)


def file_logits(path: Path, reference: Any) -> np.ndarray:
    """An exported file's logits (its first output) on ``reference``, fed as export's verification feeds it: the
    input dtype and batch its metadata names."""
    from tledge_export.graph_run import run
    from tledge_runtime.backends.loader import ort_session, read_meta

    spec = read_meta(path).input
    return run(ort_session(path), reference.inputs_for(np.dtype(spec.dtype)), fixed_batch=spec.batch)[0]


def check_against_report(run: Path, task: Task, fmt: str) -> dict[str, Any]:
    """The stored verification of ``fmt`` (export/report.json) beside this script's: the set is the export's only
    if images, agreement and changed answers match."""
    report = json.loads((run / "export" / "report.json").read_text())
    stored = next(f for f in report["formats"] if f["format"] == fmt)["verification"]
    mine = task.judge(task.logits, Budget.accuracy(BUDGETS[fmt], MIN_AGREEMENT))
    keys = ("images", "agreement", "accuracy_reference", "accuracy", "flips", "decided", "flips_decided")
    rebuilt = {k: v for k, v in mine.to_dict().items() if k in keys}
    recorded = {k: stored.get(k) for k in keys}
    same = all(rebuilt[k] == recorded[k] if not isinstance(rebuilt[k], float)
               else abs(rebuilt[k] - recorded[k]) < 1e-6 for k in keys)
    return {"same_as_export": same, "rebuilt": rebuilt, "export": recorded, "noise": mine.noise,
            "summary": mine.summary()}


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per k: % of the set, then per format the expected loss, the refusal rate of each rule, and how often
    the new rule's refusals named the accuracy loss (the rest: agreement on decided images)."""
    fmts = list(results)
    head = ["k", "% of set"] + [f"{f} {c}" for f in fmts for c in ("E[loss] pt", "old", "new", "new: loss")]
    first = results[fmts[0]]
    rows = []
    for i, k in enumerate(first["k"]):
        row = [str(k), f"{100 * k / first['images']:.2f}"]
        for f in fmts:
            r = results[f]
            row += [f"{r['expected_loss_points'][i]:+.2f}", f"{r['old'][i]:.3f}", f"{r['new'][i]:.3f}",
                    f"{r['new_reasons'][i]['accuracy']:.3f}"]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Refusal rate against k (one line per rule and format) over the expected loss, each budget's crossing marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fp16": "tab:blue", "int8": "tab:red"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=(2, 1))
    n = next(iter(results.values()))["images"]
    for i, (fmt, r) in enumerate(results.items()):
        c = colors.get(fmt, "k")
        top.plot(r["k"], r["old"], "--o", color=c, ms=3, label=f"{fmt}, old rule (point estimates)")
        top.plot(r["k"], r["new"], "-o", color=c, ms=3, label=f"{fmt}, new rule (paired interval, decided)")
        top.plot(r["k"], [x["accuracy"] for x in r["new_reasons"]], ":", color=c, lw=1,
                 label=f"{fmt}, new rule refusing for the loss (interval below zero)")
        bottom.plot(r["k"], r["expected_loss_points"], "-", color=c, label=f"{fmt} expected loss")
        bottom.axhline(r["budget_points"], color=c, lw=0.8, ls=":", label=f"{fmt} budget {r['budget_points']:g} pt")
        if r["crossing_k"] is not None:
            for ax in (top, bottom):
                ax.axvline(r["crossing_k"], color=c, lw=0.8, ls=":")
            top.annotate(f"{fmt}: expected loss\n> {r['budget_points']:g} pt", (r["crossing_k"], 0.6 - 0.25 * i),
                         xytext=(3, 0), textcoords="offset points", color=c, fontsize=8)
    top.set_ylabel("refusal rate")
    top.set_ylim(-0.03, 1.03)
    fig.suptitle(title, fontsize=9)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
    bottom.set_ylabel("expected accuracy loss, points")
    bottom.set_xlabel(f"k: answers changed (images of {n})")
    bottom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    secondary = top.secondary_xaxis("top", functions=(lambda k: 100 * k / n, lambda p: p * n / 100))
    secondary.set_xlabel("k, % of the verification set")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    return f"{model}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder exported with --fp16 --int8 (e.g. the demo's)")
    ap.add_argument("--reps", type=int, default=400, help="random sets of flipped images per k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-fraction", type=float, default=0.03, help="largest k, as a fraction of the set")
    ap.add_argument("--workers", type=int, default=2, help="image decoding threads")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gate_simulation.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "gate_simulation.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    reference, logits, answers = verification_set(args.run, args.workers)
    n = len(reference.labels)
    decision = "top class" if answers is None or answers.operating_point is None else answers.operating_point.describe()
    print(f"verification set: {n} images ({reference.data}), {reference.name}; answers: {decision}; decoded and "
          f"run in {time.perf_counter() - t0:.0f} s")
    ks = list(range(int(args.max_fraction * n) + 1))
    results, checks = {}, {}
    for fmt, fmt_logits in logits.items():
        task = Task(reference.logits, reference.labels, fmt_logits, reference.classes, answers)
        checks[fmt] = check_against_report(args.run, task, fmt)
        print(f"{fmt}: as exported: {checks[fmt]['summary']}; noise {checks[fmt]['noise']:.3g} logits; "
              f"same numbers as export's report.json: {checks[fmt]['same_as_export']}")
        t1 = time.perf_counter()
        results[fmt] = simulate(task, BUDGETS[fmt], ks, args.reps, args.seed)
        at = results[fmt]["crossing_k"]
        print(f"{fmt}: {args.reps} sets per k, k = 0..{ks[-1]}, in {time.perf_counter() - t1:.0f} s; expected loss "
              f"crosses {BUDGETS[fmt]:g} pt at k = {'never' if at is None else f'{at:.2f}'}")
    missing = sorted(set(FILES) - set(logits))
    if missing:
        print(f"not simulated (no file: refused by the export): {', '.join(missing)}")
    print(table(results))
    title = (f"{args.run.name}: {n} held-out images, {args.reps} random sets per k; fp16 budget 0.1 pt, "
             f"int8 1.0 pt, agreement 99%")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.plot, title)
    doc = {"run": str(args.run), "commit": commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d"), "reps": args.reps, "seed": args.seed,
           "images": n, "as_exported": checks, "formats": results, "not_simulated": missing}
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.json} and {args.plot} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
