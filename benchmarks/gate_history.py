"""The int8/fp16 verdicts tledge recorded before the paired gate, judged again under it from the recorded counts.

    python benchmarks/gate_history.py [--json benchmarks/results/gate_history.json]

Each record is a verification that benchmarks/RESULTS.md, its git history or an issue wrote down: images,
answers changed in each direction, accuracy change. ELPV is a binary task, so every changed answer went right ->
wrong or wrong -> right, and ``changed = to_wrong + to_correct``; where only the agreement was recorded, the
changed count is ``round((1 - agreement) * images)``.

What the counts decide exactly, through the gate itself (:func:`tledge_export.verify.gate.judge` on a
:class:`~tledge_runtime.model.verification.Verification` carrying the recorded counts):

- the **accuracy** part: the paired 95% interval (:func:`~tledge_export.verify.gate.paired_interval`) and
  McNemar's p. Where the directions were not recorded, every split of the changed answers is judged and the
  table says which splits would be refused.
- the **old rule** (point estimates, agreement over every image).

What they bound only: the **agreement on decided images**. Which changed answers were decided (PyTorch's margin
above the format's noise) needs the logits, which no record kept. The gate refuses when more than 1% of the
decided images changed, so the table gives the fewest decided changes that refuse, with all images decided and
with only half of them (fewer than half decided is itself a refusal, for noise, also unknowable here).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tledge_export.verify.gate import MIN_DECIDED, judge, paired_interval
from tledge_runtime.model.verification import Budget, Flips, Verification, mcnemar_p

ROOT = Path(__file__).resolve().parents[1]
N = 852  # held-out val+test images of every ELPV run below (197 + 655)
BUDGET = {"fp16": 0.1, "int8": 1.0}  # points, the defaults then and now
MIN_AGREEMENT = 99.0


@dataclass(frozen=True)
class Record:
    name: str
    source: str
    fmt: str
    changed: int
    to_wrong: Optional[int] = None  # None: the directions were not recorded
    images: int = N

    @property
    def to_correct(self) -> Optional[int]:
        return None if self.to_wrong is None else self.changed - self.to_wrong


HISTORY = (
    Record("demo (fresh clone), fp16", "issue 25: 86.15% vs 86.27%, agreement 99.9%", "fp16", 1, 1),
    Record("demo (fresh clone), int8 after QAT", "issue 25: 98.83%, 4 -> wrong, 6 -> right, +0.23", "int8", 10, 4),
    Record("demo (fresh clone, before QAT existed), int8", "issue 13: 98.24%, 15 of 852 changed", "int8", 15),
    Record("demo §1 (09d7928), int8 post-training all-int8", "RESULTS §1: 98.83% (QAT then passed, 99.06%)",
           "int8", 10),
    Record("Lite1 seed 1, int8 after QAT", "RESULTS §2: 97.89%, 4 -> wrong, 14 -> right, +1.17", "int8", 18, 4),
    Record("Lite2 seed 0, int8 post-training all-int8", "RESULTS §2b: 98.83%, 10 of 852 changed", "int8", 10),
    Record("Lite2 seed 0, int8 QAT 38 steps (closest miss)", "RESULTS §2b: 98.47%, Δ -0.12", "int8", 13, 7),
    Record("Lite2 seed 0, int8 QAT 113 steps (closest miss)", "RESULTS §2b: 98.71%, 11 changed, Δ -0.12", "int8", 11, 6),
    Record("Lite0 224 px seed 0, int8 QAT 40 steps (qat_elpv.py)", "RESULTS §8: 98.94%, 3 -> right, 6 -> wrong, -0.35",
           "int8", 9, 6),
)


def verification(r: Record, to_wrong: int, budget: Budget, decided: Optional[int] = None,
                 flips_decided: int = 0) -> Verification:
    """A verification with the record's counts (and, for the agreement part, a hypothesis of how many images and
    changed answers were decided). Only differences are judged, so PyTorch's accuracy is set to one half."""
    to_correct = r.changed - to_wrong
    delta = (to_correct - to_wrong) / r.images
    return Verification(images=r.images, max_abs_diff=None, mean_abs_diff=None, agreement=1 - r.changed / r.images,
                        accuracy_reference=0.5, accuracy=0.5 + delta, budget=budget, passed=True,
                        flips=Flips(to_correct=to_correct, to_wrong=to_wrong),
                        mcnemar_p=mcnemar_p(to_correct, to_wrong),
                        accuracy_interval=paired_interval(to_correct, to_wrong, r.images),
                        noise=0.0, decided=r.images if decided is None else decided, flips_decided=flips_decided)


def accuracy_part(r: Record) -> dict[str, Any]:
    """The new rule's accuracy verdict: exact from the directions, or over every split when they are unknown."""
    budget = Budget.accuracy(BUDGET[r.fmt], 0.0)  # agreement off: the accuracy part alone
    splits = range(r.changed + 1) if r.to_wrong is None else [r.to_wrong]
    refused = [b for b in splits if judge(verification(r, b, budget), True)]
    out: dict[str, Any] = {"refusing_to_wrong": refused}
    if r.to_wrong is not None:
        v = verification(r, r.to_wrong, budget)
        out.update(delta_points=round(v.accuracy_delta_points, 2), interval=[round(x, 2) for x in v.accuracy_interval],
                   mcnemar_p=round(v.mcnemar_p, 3), refused=bool(refused))
        out["words"] = "refused" if refused else "passes"
    else:
        out["words"] = (f"passes unless >= {refused[0]} of {r.changed} went right -> wrong" if refused
                        else "passes for every split")
    return out


def agreement_part(r: Record) -> dict[str, Any]:
    """The fewest decided changed answers that make the new rule refuse, with every image decided and with the
    fewest decided images that escape the noise refusal (half of them)."""
    budget = Budget.accuracy(1000.0, MIN_AGREEMENT)  # accuracy off: the agreement part alone
    half = math.ceil(MIN_DECIDED * r.images)
    least = {}
    for decided in (r.images, half):
        least[decided] = next((f for f in range(r.changed + 1)
                               if judge(verification(r, r.to_wrong or 0, budget, decided, f), True)), None)
    full, low = least[r.images], least[half]
    if full is None and low is None:
        words = "passes whichever were decided"
    elif full is None:
        words = f"refused only if >= {low} of {r.changed} were decided and at most {half} images were"
    else:
        words = f"refused only if >= {full} of {r.changed} were decided ({low} if only {half} images were)"
    return {"least_decided_changes_refusing": {str(k): v for k, v in least.items()}, "words": words}


def old_rule(r: Record) -> str:
    budget = Budget("accuracy", max_drop_points=BUDGET[r.fmt], min_agreement=MIN_AGREEMENT, rule="point")
    splits = range(r.changed + 1) if r.to_wrong is None else [r.to_wrong]
    verdicts = {bool(judge(verification(r, b, budget), True)) for b in splits}
    return "refused" if verdicts == {True} else "passed" if verdicts == {False} else "depends on the split"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gate_history.json")
    args = ap.parse_args()
    rows, doc = [], []
    for r in HISTORY:
        acc, agree = accuracy_part(r), agreement_part(r)
        counts = f"{r.changed} ({r.to_wrong}/{r.to_correct})" if r.to_wrong is not None else f"{r.changed} (?/?)"
        delta = ("{:+.2f} [{:+.2f}, {:+.2f}] p {:.2g}".format(acc["delta_points"], *acc["interval"], acc["mcnemar_p"])
                 if "delta_points" in acc else "not recorded")
        rows.append([r.name, f"{r.fmt} {BUDGET[r.fmt]:g} pt", f"{100 * (1 - r.changed / r.images):.2f}", counts, delta,
                     old_rule(r), acc["words"], agree["words"]])
        doc.append({"record": r.name, "source": r.source, "format": r.fmt, "images": r.images, "changed": r.changed,
                    "to_wrong": r.to_wrong, "to_correct": r.to_correct, "old_rule": old_rule(r), "accuracy": acc,
                    "agreement_on_decided": agree})
    head = ["record", "budget", "agree %", "changed (-/+)", "Δ pt [95%] McNemar p", "old rule", "new: accuracy",
            "new: agreement on decided (needs the logits)"]
    print(_table(head, rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": N, "min_agreement": MIN_AGREEMENT, "records": doc}, indent=1) + "\n")
    print(f"wrote {args.json}")


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (what RESULTS.md takes as printed)."""
    lines = ["| " + " | ".join(r) + " |" for r in [head] + rows]
    lines.insert(1, "|" + "---|" * len(head))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
