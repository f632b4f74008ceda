"""The `tledge` command line for data, finetune and evaluate: help, JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tledge import __version__
from tledge.cli.main import main

from ...datasets import make_dataset


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def _one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("command", [[], ["finetune"], ["evaluate"], ["data"], ["data", "elpv"]])
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_help_imports_no_heavy_library_and_lists_every_command():
    """`tledge --help` (and every command's --help) loads Click and tledge's option tables only."""
    code = ("import sys\nfrom tledge.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'matplotlib', 'timm', 'numpy') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in proc.stdout
    for command in ("finetune", "export", "benchmark", "evaluate", "demo", "data"):
        assert f"  {command}" in proc.stdout


@pytest.mark.parametrize("args, fragments", [
    (["finetune", "/no/such/folder"], ["'DATA'", "does not exist"]),
    (["finetune", ".", "--arch", "vgg19"], ["--arch", "vgg19"]),
    (["finetune", ".", "--epochs", "0"], ["--epochs", "0 is not in the range"]),
    (["finetune", ".", "--lr", "-1"], ["--lr"]),
    (["finetune", ".", "--batch-size", "many"], ["--batch-size", "not a valid integer"]),
    (["finetune", ".", "--weights", "/no/such.pth"], ["--weights", "neither 'imagenet', 'none' nor an existing file"]),
    (["finetune", ".", "--resume"], ["--resume needs --out"]),
    (["finetune", ".", "--precision", "fp16"], ["--precision", "'fp16' is not one of"]),
    (["finetune", ".", "--compile", "maybe"], ["--compile", "'maybe' is not one of"]),
    (["finetune", ".", "--threads", "0"], ["--threads", "0 is not in the range"]),
    (["evaluate", "/no/such.pt", "."], ["does not exist"]),
])
def test_bad_options_exit_2_with_one_line(args, fragments):
    _one_line_error(run(*args), 2, *fragments)


def test_unusable_data_exits_1_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "only").mkdir(parents=True)
    (tmp_path / "data" / "only" / "a.png").write_bytes(b"")
    _one_line_error(run("finetune", "data"), 2, "only one class")
    assert not (tmp_path / "runs").exists()


def test_evaluate_text_json_and_plot(tiny_run, tmp_path):
    data = make_dataset(tmp_path / "eval", per_class=5)
    result = run("evaluate", str(tiny_run.best), str(data), "--plot", str(tmp_path / "cm.png"))
    assert result.exit_code == 0, result.output
    assert "confusion matrix" in result.output and "precision" in result.output
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    result = run("evaluate", str(tiny_run.best), str(data), "--json")
    report = json.loads(result.stdout)
    assert report["images"] == 15 and report["accuracy"] >= 0.9
    assert set(report["per_class"]) == {"red", "green", "blue"}
    assert sum(map(sum, report["confusion"])) == 15


def test_evaluate_refuses_other_files_and_unknown_classes(tiny_run, tmp_path):
    data = make_dataset(tmp_path / "eval", per_class=2)
    not_ours = tmp_path / "weights.pt"
    import torch

    torch.save({"conv.weight": torch.zeros(1)}, not_ours)
    _one_line_error(run("evaluate", str(not_ours), str(data)), 2, "not a tledge checkpoint")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(tiny_run.best.read_bytes()[:5000])
    _one_line_error(run("evaluate", str(corrupt), str(data)), 2, "corrupt or truncated checkpoint")
    (data / "purple").mkdir()
    (data / "purple" / "p.png").write_bytes(next((data / "red").glob("*.png")).read_bytes())
    _one_line_error(run("evaluate", str(tiny_run.best), str(data)), 2, "purple", "not classes of this model")


def test_finetune_cli_json(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=6)
    result = run("finetune", str(data), "--out", str(tmp_path / "run"), "--img-size", "32", "--epochs", "2",
                 "--freeze-epochs", "2", "--json", "--workers", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["arch"] == "efficientnet_lite0" and metrics["epochs_run"] == 2
    assert (tmp_path / "run" / "best.pt").is_file()


def test_data_elpv_materializes_the_real_dataset(tmp_path):
    pytest.importorskip("elpv_dataset")
    out = tmp_path / "elpv"
    result = run("data", "elpv", str(out))
    assert result.exit_code == 0, result.output
    counts = {split: {c: len(list((out / split / c).glob("*.png"))) for c in ("functional", "defective")}
              for split in ("train", "test")}
    assert sum(sum(c.values()) for c in counts.values()) == 2624
    assert sum(counts["test"].values()) == 655  # 25 %, stratified by class and module type
    assert counts["test"]["defective"] / sum(counts["test"].values()) == pytest.approx(821 / 2624, abs=0.01)
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0] == "path,split,class,probability,module_type" and len(rows) == 2625
    _one_line_error(run("data", "elpv", str(out)), 2, "not empty", "--overwrite")


def test_data_elpv_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)  # what Python does for a package that is not installed
    _one_line_error(run("data", "elpv", str(tmp_path / "elpv")), 2, "not installed", "pip install elpv-dataset")
    assert not (tmp_path / "elpv").exists()


def test_line_progress_in_logs_shows_rate_and_eta(capsys, monkeypatch):
    from tledge.progress import progress

    monkeypatch.setenv("CI", "true")
    bar = progress(total=10, desc="work", unit="img")
    bar.interval = 0.0  # emit on every update
    bar.update(5)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("work: 5/10 img [") and "img/s, ETA" in lines[0]
    assert "\r" not in "".join(lines)


def test_line_progress_of_slow_steps_says_seconds_per_step(capsys, monkeypatch):
    from tledge.progress import progress

    monkeypatch.setenv("CI", "true")
    bar = progress(total=3, desc="export", unit="step")
    bar.interval = 0.0
    bar.start -= 40.0  # one step took 40 s: "0.0 step/s" before
    bar.update(1)
    bar.close()
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert line.startswith("export: 1/3 step [40s, 40.0 s/step, ETA 80s]"), line


def test_log_lines_reach_the_stderr_of_each_invocation():
    # Each line exactly once (not again through the root logger's handler). CI found: the handler kept the first invocation's stderr, so a second main() in the same
    # process (an embedding app, Click's runner) lost its warnings, skip counts among them.
    import logging

    import click

    from tledge.cli.common import setup_logging as _setup_logging

    @click.command()
    def cmd():
        _setup_logging()
        logging.info("a library logging on the root logger")  # gives root a handler (basicConfig)
        logging.getLogger("tledge.data.folders").warning("skipped 1 of 2 images")

    runner = CliRunner()
    for _ in range(3):
        assert runner.invoke(cmd, []).output == "warning: skipped 1 of 2 images\n"  # the house format
