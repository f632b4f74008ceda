"""--operating-point: a binary task's threshold chosen on the validation split, carried by the export, and the
same decision in `tledge evaluate`, export verification and the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tledge.answers.operating_point import Spec, choose, parse_spec
from tledge.errors import ConfigError

from ...datasets import TINY, make_dataset


def test_recall_target_takes_the_highest_threshold_that_reaches_it():
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1])  # class 1 = "bad"
    point, said = choose(Spec("bad", "recall", 0.8), np.stack([1 - p, p], 1), y, ["ok", "bad"], "val split")
    # recall >= 0.8 needs 5 of 6 "bad": threshold between 0.3 and 0.4 keeps 0.4 .. 0.95
    assert 0.3 < point.threshold <= 0.4 and point.target == "recall=0.8"
    assert "recall 83.3%" in said and "precision 83.3%" in said


def test_precision_target_takes_the_lowest_threshold_that_reaches_it():
    p = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1])
    point, _ = choose(Spec("bad", "precision", 0.999), np.stack([1 - p, p], 1), y, ["ok", "bad"], "val")
    assert 0.6 < point.threshold <= 0.7  # 0.7 .. 0.95 are all "bad"


def test_an_unreachable_target_is_said_not_defaulted():
    p = np.array([0.9, 0.8, 0.1])
    y = np.array([0, 0, 1])
    point, said = choose(Spec("bad", "precision", 0.99), np.stack([1 - p, p], 1), y, ["ok", "bad"], "val split")
    assert point is None and "no threshold reaches precision 0.99" in said


@pytest.mark.parametrize("text", ["defective", "defective:recall", "defective:recall=1.0", "defective:f1=0.9",
                                  ":recall=0.9", "defective:recall=abc"])
def test_malformed_specs_are_usage_errors(text):
    with pytest.raises(ConfigError) as e:
        parse_spec(text)
    assert "CLASS:recall=0.95" in e.value.hint


@pytest.mark.parametrize("spec, words", [("blue:recall=0.9", "two classes"), ])
def test_a_three_class_task_is_refused_before_training(tmp_path, spec, words):
    from tledge.cli.main import main

    data = make_dataset(tmp_path / "data", per_class=4)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", str(data), "--out", str(out), "--operating-point", spec,
                                       "--img-size", "32", "--epochs", "1"])
    assert result.exit_code == 2 and words in result.output
    assert not (out / "last.pt").exists()


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    from tledge.train.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("binary")
    data = make_dataset(root / "data", per_class=16, classes=("red", "green"))
    return finetune(FinetuneConfig(data=str(data), out=str(root / "run"), operating_point="green:recall=0.9", **TINY))


def test_the_run_chooses_stores_and_reports_it(binary_run):
    from tledge.train.checkpoint import load_checkpoint

    answers = binary_run.metrics["answers"]
    point = answers["operating_point"]
    assert point["label"] == "green" and 0 < point["threshold"] < 1 and point["target"] == "recall=0.9"
    assert point["measured"].startswith("val split")
    assert answers["test_at_operating_point"]["per_class"]["green"]["recall"] >= 0.9 - 1e-9
    assert load_checkpoint(binary_run.best)["answers"]["operating_point"] == point
    saved = json.loads((binary_run.out / "metrics.json").read_text())
    assert saved["answers"]["operating_point"] == point


def test_export_runtime_and_evaluate_decide_alike(binary_run, tmp_path):
    from tledge.cli.main import main
    from tledge.data.folders import Splits
    from tledge_runtime import Classifier

    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["export", str(binary_run.best), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["formats"][0]["verification"]["decision"].startswith("green when p(green) >= ")
    test = Splits.from_json((binary_run.out / "split.json").read_text()).test
    with Classifier(out / "model.onnx", device="cpu") as clf:
        point = clf.meta.answers.operating_point
        assert point.threshold == binary_run.metrics["answers"]["operating_point"]["threshold"]
        probs = clf.scores_batch([str(s.path) for s in test])
        runtime = [p.label for p in clf.predict_batch([str(s.path) for s in test])]
    g = clf.labels.index("green")
    assert runtime == ["green" if p[g] >= point.threshold else "red" for p in probs]
    shown = CliRunner().invoke(main, ["evaluate", str(binary_run.best), str(binary_run.metrics["config"]["data"]),
                                      "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc["operating_point"]["threshold"] == point.threshold and doc["at_operating_point"]["images"] > 0


def test_evaluate_can_choose_a_new_point_on_the_validation_split(binary_run):
    from tledge.cli.main import main

    data = binary_run.metrics["config"]["data"]
    shown = CliRunner().invoke(main, ["evaluate", str(binary_run.best), data, "--operating-point", "red:precision=0.9"])
    assert shown.exit_code == 0, shown.output
    assert "at the operating point (red when p(red) >= " in shown.stdout and "val split" in shown.stdout
    assert "precision" in shown.stdout and "recall" in shown.stdout
