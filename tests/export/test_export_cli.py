"""`tledge export` on the command line: one-line errors, non-zero exit with the numbers when over budget, JSON."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from tledge.cli.main import main
from tledge_export.artifact import read_meta

from ..datasets import grey_images


def run(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def _one_line_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_help():
    result = run("--help")
    assert result.exit_code == 0
    for option in ("--fp16", "--int8", "--calib-method", "--target", "--bake-preprocess", "--engine", "--triton",
                   "--budget", "--batch", "--max-batch", "--opset", "--json"):
        assert option in result.output


def test_bad_checkpoints_are_one_line_errors(tiny_run, tmp_path):
    import torch

    _one_line_error(run(str(tmp_path / "missing.pt")), 2, "no such checkpoint file")
    other = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    _one_line_error(run(str(other)), 2, "not a tledge checkpoint")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_run.best.read_bytes()[:4000])
    _one_line_error(run(str(corrupt)), 2, "corrupt or truncated checkpoint")
    alone = tmp_path / "alone" / "best.pt"
    alone.parent.mkdir()
    shutil.copy(tiny_run.best, alone)
    _one_line_error(run(str(alone)), 2, "split.json", "held-out images")
    assert not (tmp_path / "alone" / "export").exists()


@pytest.mark.parametrize("args, code, fragments", [
    (["--batch", "many"], 2, ["--batch", "neither 'dynamic' nor a batch size"]),
    (["--calib-method", "kl"], 2, ["--calib-method"]),
    (["--int8", "--engine"], 2, ["--target tensorrt"]),
    (["--triton", "--batch", "4"], 2, ["dynamic batch"]),
])
def test_bad_option_combinations_fail_before_any_work(tiny_run, tmp_path, args, code, fragments):
    _one_line_error(run(str(tiny_run.best), "--out", str(tmp_path / "x"), *args), code, *fragments)
    assert not (tmp_path / "x").exists()


def test_int8_over_budget_exits_1_with_the_numbers(tiny_run, exported, tmp_path):
    """Calibrated on flat grey images, int8 clips every real activation; one float node cannot save it.
    With a fixed batch of 4 (15 held-out images: the last batch is padded) throughout."""
    calib = grey_images(tmp_path / "grey", 6)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.int8.onnx", ".tledge-export"):  # left by an earlier, good export into this folder
        shutil.copy(exported.out / name, out / name)
    result = run(str(tiny_run.best), "--out", str(out), "--int8", "--calib", str(calib), "--budget", "0",
                 "--max-float-nodes", "1", "--batch", "4", "--workers", "2")
    # post-training int8 (accuracy-aware) missed, so did quantization-aware training (--qat auto): both are said,
    # each decision once, then one error line: what was refused and written, and what to try
    _one_line_error(result, 1, "refused int8 (over budget); wrote model.onnx (+ report.json)",
                    "post-training int8 (up to 1 node(s) kept in float) and quantization-aware training",
                    "--calib-method", "--qat-epochs")
    lines = result.output.splitlines()
    refused = [line for line in lines if line.startswith("warning: int8 refused, not written: ")]
    assert len(refused) == 1 and "points > budget 0" in refused[0] and "% vs PyTorch" in refused[0]
    error = refused[0]
    story = [line for line in lines if line.startswith(("post-training int8", "quantization-aware training next",
                                                         "QAT int8"))]
    assert [s.split(",")[0].split(":")[0] for s in story][:1] == ["post-training int8"]
    assert any(s.startswith("quantization-aware training next, because post-training int8 missed") for s in story)
    assert any(s.startswith("QAT int8, every node int8:") for s in story)
    assert len(lines) == len(set(lines)), "a line was printed twice"
    report = json.loads((out / "report.json").read_text())
    formats = {f["format"]: f for f in report["formats"]}
    assert formats["fp32"]["status"] == "ok" and formats["int8"]["status"] == "over_budget"
    assert not report["ok"] and report["images"]["calibration"] == 6
    assert formats["int8"]["qat"]["steps"] >= 1 and formats["int8"]["quantization"]["method"] == "qat"
    attempts = formats["int8"]["post_training"]["attempts"]
    assert [len(a["float_nodes"]) for a in attempts] == [0, 1] and not any(a["passed"] for a in attempts)
    drop = -formats["int8"]["verification"]["accuracy_delta_points"]
    assert drop > 0 and f"{drop:.2f} points" in error
    assert read_meta(out / "model.onnx").input.batch == 4
    assert [d.dim_value for d in onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim] == [
        4, 3, 32, 32]
    assert not (out / "model.int8.onnx").exists()  # not written, and the stale one removed
    assert json.loads((out / "report.json").read_text())["formats"][1]["status"] == "over_budget"
