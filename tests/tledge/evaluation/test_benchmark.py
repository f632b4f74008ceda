"""`tledge benchmark`: rows for every format, status rows instead of crashes, JSON that matches the table."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from tledge.cli.main import main
from tledge.errors import ConfigError
from tledge.evaluation.bench_table import to_markdown
from tledge.evaluation.benchmark import benchmark, discover
from tledge.exporting import export_checkpoint
from tledge_export import ExportConfig

from ...datasets import make_dataset


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run with an fp32 and an fp16 export (int8 deliberately left out: a missing format)."""
    root = tmp_path_factory.mktemp("bench")
    run = root / "run"
    shutil.copytree(tiny_run.out, run)
    export_checkpoint(run / "best.pt", ExportConfig(fp16=True))
    data = make_dataset(root / "data", per_class=8, seed=100)
    return run, data


def _scramble_head(src, dst, *, keep_reference_set: bool = True):
    """A broken export: the classifier's weight rows rotated, so classes come out permuted."""
    from tledge_export.artifact import embed_meta, read_meta

    model = onnx.load(src)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and 3 in w.shape:
            rolled = np.roll(w, 1, axis=w.shape.index(3))
            init.CopyFrom(numpy_helper.from_array(rolled.astype(w.dtype), init.name))
    if not keep_reference_set:  # as a model exported before reference sets were: only accuracy can catch it
        embed_meta(model, read_meta(model).with_(reference_set=None))
    onnx.save(model, dst)


def test_every_format_gets_a_row_and_a_missing_one_says_so(exported, tmp_path):
    run, data = exported
    result = benchmark([run], data, iters=5, warmup=1, plot=tmp_path / "b.png")
    by_name = {r.name: r for r in result.rows}
    assert list(by_name) == ["best.pt", "model.fp16.onnx", "model.onnx", "model.int8.onnx"]
    torch_row, fp32 = by_name["best.pt"], by_name["model.onnx"]
    assert torch_row.backend == "pytorch-eager" and fp32.backend == "ort-cpu"
    assert fp32.status == "ok" and fp32.agreement == 100.0 and fp32.delta_points == 0.0
    assert fp32.accuracy == torch_row.accuracy
    assert by_name["model.fp16.onnx"].agreement >= 95.0
    missing = by_name["model.int8.onnx"]
    assert missing.status == "missing" and "--int8" in missing.reason
    for r in (torch_row, fp32):
        assert 0 < r.p50_ms <= r.p99_ms and r.throughput > 0 and r.size_mb > 0
    assert result.recommendation.startswith("ship model") and "faster than PyTorch" in result.recommendation
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    table = to_markdown(result)
    assert table.count("\n") == len(result.rows) + 1


def test_over_budget_and_failed_backends_are_rows_not_crashes(exported, tmp_path):
    run, data = exported
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(run / "export" / "model.onnx", models / "model.onnx")
    _scramble_head(run / "export" / "model.onnx", models / "model.scrambled.onnx")
    _scramble_head(run / "export" / "model.onnx", models / "model.unchecked.onnx", keep_reference_set=False)
    (models / "model.truncated.onnx").write_bytes((run / "export" / "model.onnx").read_bytes()[:2000])
    result = benchmark([run / "best.pt", models], data, backends=("ort-cpu", "ort-cuda"), iters=5, warmup=1)
    rows = {(r.name, r.backend): r for r in result.rows}
    scrambled = rows[("model.scrambled.onnx", "ort-cpu")]  # its own reference set catches it
    assert scrambled.status == "check failed" and scrambled.check == "differs: numerics"
    assert "numerics on ort-cpu" in scrambled.reason and scrambled.delta_points < -50
    unchecked = rows[("model.unchecked.onnx", "ort-cpu")]  # no reference set: the accuracy budget catches it
    assert unchecked.status == "over budget" and unchecked.check == "-" and "budget" in unchecked.reason
    assert rows[("model.onnx", "ort-cpu")].check == "ok"
    cuda = rows[("model.onnx", "ort-cuda")]  # this machine has no CUDA provider: a failed row
    assert cuda.status == "failed" and "CUDAExecutionProvider" in cuda.reason
    broken = next(r for r in result.rows if r.name == "model.truncated.onnx")
    assert broken.status == "failed" and broken.reason
    assert "model.onnx on ort-cpu" in result.recommendation  # the broken rows never win


def test_cli_json_parses_and_matches_the_table(exported, tmp_path):
    run, data = exported
    args = ["benchmark", str(run), "--data", str(data), "--iters", "5", "--warmup", "1", "--plot", str(tmp_path / "p.png")]
    table = CliRunner().invoke(main, args)
    as_json = CliRunner().invoke(main, args + ["--json"])
    assert table.exit_code == 0 and as_json.exit_code == 0, table.output + as_json.output
    payload = json.loads(as_json.stdout)
    lines = [line for line in table.stdout.splitlines() if line.startswith("| ") and not line.startswith("| model | precision")]
    assert len(lines) == len(payload["rows"])
    for line, row in zip(lines, payload["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["name"] and cells[2] == row["backend"]
        assert cells[-1].split(":")[0] == row["status"]
        if row["accuracy"] is not None:
            assert cells[4] == f"{100 * row['accuracy']:.2f}%"
    assert payload["machine"]["cores"] >= 1 and payload["recommendation"]
    assert "recommendation:" in table.stdout


def test_nothing_to_benchmark_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nothing to benchmark"):
        discover([tmp_path])
    result = CliRunner().invoke(main, ["benchmark", str(tmp_path), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to benchmark" in result.output


def test_bad_batch_and_backend_options(exported):
    run, data = exported
    for extra in (["--batch", "0"], ["--batch", "x"], ["--backend", "cuda9"]):
        result = CliRunner().invoke(main, ["benchmark", str(run), "--data", str(data), *extra])
        assert result.exit_code == 2 and "error: " in result.output


def test_a_format_the_export_refused_says_why_it_is_missing(exported, tmp_path):
    """The export's report.json names a refused format: the missing row gives that reason, not "run export"."""
    run, _ = exported
    export = tmp_path / "export"
    shutil.copytree(run / "export", export)
    report = json.loads((export / "report.json").read_text())
    report["formats"].append({"format": "int8", "status": "over_budget", "file": None,
                              "message": "top-1 agreement with PyTorch 98.94% < 99%"})
    (export / "report.json").write_text(json.dumps(report))
    why = {name: reason for name, _, reason in discover([export]).missing}
    assert why["model.int8.onnx"] == "refused by tledge export (over budget): top-1 agreement with PyTorch 98.94% < 99%"
    (export / "report.json").write_text("{not json")  # a broken report is only a lost hint
    assert "--int8" in {name: reason for name, _, reason in discover([export]).missing}["model.int8.onnx"]
