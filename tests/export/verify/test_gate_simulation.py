"""benchmarks/gate_simulation.py on a small synthetic verification set (no ELPV, a few seconds): the two properties
issue 25 asks the new rule to have, checked through the script's own simulation so the script cannot rot.

1. a change of at most one image is never refused (k = 0 and 1: refusal rate 0), where the old rule refused fp16
   at k = 1;
2. a real loss over the budget is refused reliably (refusal rate near 1)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tledge_runtime.model.answers import Answers, OperatingPoint

from .gate_testkit import binary_task

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "gate_simulation.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("gate_simulation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _task(sim, n: int = 600, seed: int = 0, noise: float = 0.05, answers=None):
    """A simulated binary task (gate_testkit.binary_task) as the simulation's Task."""
    ref, fmt, labels = binary_task(n, seed, noise)
    return sim.Task(ref, labels, fmt, ("0", "1"), answers)


def test_flip_changes_exactly_the_chosen_answers(sim):
    for answers in (None, Answers(1.0, OperatingPoint("1", 0.2, "recall=0.95"))):
        task = _task(sim, answers=answers)
        rows = sim.candidates(task)[:7]
        flipped = sim.flip(task, task.logits, rows)
        changed = np.flatnonzero(task.decided(flipped) != task.decided(task.logits))
        assert changed.tolist() == sorted(rows.tolist())


def test_one_image_is_never_refused_and_a_real_loss_always_is(sim):
    task = _task(sim)
    n = len(task.labels)
    ks = [0, 1, int(0.03 * n)]  # 3% of the set: 18 images, an expected loss of about 2.4 points
    fp16 = sim.simulate(task, 0.1, ks, reps=60, seed=1)
    int8 = sim.simulate(task, 1.0, ks, reps=60, seed=1)
    for r in (fp16, int8):
        assert r["new"][:2] == [0.0, 0.0], r  # k = 0, 1: never refused under the new rule
        assert r["expected_loss_points"][2] > 2 * r["budget_points"]
        assert r["new"][2] >= 0.95, r  # a real loss, twice the budget: refused
    assert fp16["old"][1] > 0.5  # the old rule refused one broken image (0.17 points > 0.1)
    # the expected loss is what the simulation measured on average
    assert fp16["mean_loss_points"][2] == pytest.approx(fp16["expected_loss_points"][2], abs=0.3)


def test_crossing_is_where_the_expected_loss_reaches_the_budget(sim):
    assert sim.crossing(base=-0.2, per_flip=-0.1, max_drop_points=1.0) == pytest.approx(8.0)
    assert sim.crossing(base=-1.5, per_flip=-0.1, max_drop_points=1.0) == 0.0
    assert sim.crossing(base=0.0, per_flip=0.05, max_drop_points=1.0) is None


def test_table_has_a_row_per_k(sim):
    task = _task(sim, n=200)
    results = {"fp16": sim.simulate(task, 0.1, [0, 1, 2], reps=5), "int8": sim.simulate(task, 1.0, [0, 1, 2], reps=5)}
    lines = sim.table(results).splitlines()
    assert len(lines) == 2 + 3 and "fp16 old" in lines[0] and "int8 new" in lines[0]


@pytest.fixture(scope="module")
def history():
    spec = importlib.util.spec_from_file_location("gate_history", SCRIPT.with_name("gate_history.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_history_rejudges_the_issue_25_demo_from_its_counts(history):
    fp16, int8 = history.HISTORY[:2]
    assert history.old_rule(fp16) == history.old_rule(int8) == "refused"
    assert history.accuracy_part(fp16)["refused"] is False and history.accuracy_part(int8)["refused"] is False
    assert history.agreement_part(fp16)["words"] == "passes whichever were decided"
    # 10 changed answers: refused for agreement only if more than 1% of the 852 decided images changed, i.e. 9
    assert history.agreement_part(int8)["least_decided_changes_refusing"]["852"] == 9
    unknown = history.Record("15 changed, directions unknown", "", "int8", 15)
    assert history.accuracy_part(unknown)["refusing_to_wrong"] == [12, 13, 14, 15]  # Δ <= -1.06 and below zero
