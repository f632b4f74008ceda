"""End-to-end parity, checked from outside: `tledge evaluate --predictions` (PyTorch, training's code path)
against the runtime's Classifier on the exported fp32 ONNX, image file by image file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from click.testing import CliRunner


def test_evaluate_predictions_equal_the_runtime_on_the_exported_model(tiny_run, exported, tmp_path):
    from tledge.cli.main import main
    from tledge_runtime import Classifier

    data = Path(tiny_run.metrics["config"]["data"])
    csv_path = tmp_path / "predictions.csv"
    result = CliRunner().invoke(main, ["evaluate", str(tiny_run.best), str(data), "--predictions", str(csv_path)])
    assert result.exit_code == 0, result.output
    assert f"wrote {csv_path}" in result.output
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    body = rows[1:]
    assert len(body) == sum(1 for _ in data.rglob("*.png")) and body
    with Classifier(exported.get("fp32").path, device="cpu") as clf:
        labels = list(clf.labels)
        device_probs = clf.scores_batch([row[0] for row in body])
    assert rows[0] == ["path", "true", "pred", *labels]
    torch_probs = np.array([[float(v) for v in row[3:]] for row in body])
    assert np.abs(torch_probs - device_probs).max() <= 1e-4
    for row, probs in zip(body, torch_probs):
        assert row[2] == labels[int(np.argmax(probs))] and row[1] == Path(row[0]).parent.name
        assert abs(probs.sum() - 1) < 1e-6
