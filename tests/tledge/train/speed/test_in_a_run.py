"""The probe inside `tledge finetune`: decided once at run start, said in one line, saved with the run, and the
speed-ups never change what the run learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tledge.cli.main import main
from tledge.train.finetune import FinetuneConfig, finetune
from tledge.train.speed.cpu import read_cpu

from ....datasets import TINY, cli_options, make_dataset

TIME_KEYS = ("seconds", "images_per_s")


def _assert_same_history(a, b):
    """Every epoch's numbers equal, floats to fp32 rounding (folding reorders a few multiplications)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x.keys() - set(TIME_KEYS):
            expected = pytest.approx(y[k], rel=1e-4, abs=1e-6) if isinstance(y[k], float) else y[k]
            assert x[k] == expected, (x["epoch"], k)


def test_the_choice_is_printed_once_and_saved_with_the_run(tiny_run):
    speed = json.loads((tiny_run.out / "metrics.json").read_text())["speed"]
    cpu = read_cpu()
    assert speed["device"] == "cpu" and speed["speedups"] is True and speed["compile"] is False
    assert speed["precision"] == "fp32" or cpu.native_bf16  # bf16 only with bf16 in hardware
    assert speed["threads"] == cpu.cores and speed["cache_key"].startswith(cpu.model)
    assert speed["measured"]["fold_error"]["logits"] < 1e-4
    log = (tiny_run.out / "train.log").read_text().splitlines()
    lines = [line for line in log if "fine-tuning on cpu:" in line]
    assert len(lines) == 1 and "speed-ups on" in lines[0]


def test_speedups_change_no_result(tiny_run, tmp_path):
    """The plain loop (--no-speedups) learns what the default learns, to fp32 rounding."""
    data = make_dataset(tmp_path / "data", per_class=16)
    plain = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "run"), speedups=False, precision="fp32",
                                    compile="off", **TINY))
    assert plain.metrics["speed"]["speedups"] is False
    _assert_same_history(plain.history, tiny_run.history)
    assert plain.metrics["test_accuracy"] == tiny_run.metrics["test_accuracy"]


def test_options_reach_the_run_from_the_command_line(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    args = ["finetune", str(data), "--out", str(tmp_path / "run"), "--json", "--precision", "bf16", "--compile", "off",
            "--threads", "1", "--no-speedups"]
    args += cli_options({**TINY, "epochs": 3})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output[result.output.index("{"):])["speed"]
    assert (speed["precision"], speed["compile"], speed["threads"], speed["speedups"]) == ("bf16", False, 1, False)
    assert any("bf16 as asked" in r for r in speed["reasons"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["config"]["precision"] == "bf16" and saved["config"]["threads"] == 1


def test_the_command_line_lets_idle_threads_sleep_before_torch_loads():
    code = ("import os, sys\nfrom tledge.train.speed.apply import prefer_sleeping_threads\nprefer_sleeping_threads()\n"
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                          text=True, check=True).stdout
    assert kept.split()[0] == "ACTIVE"  # never over the user's choice
    late = subprocess.run([sys.executable, "-c", "import torch\n" + code], env=env, capture_output=True, text=True,
                          check=True).stdout
    assert late.split()[0] == "None"  # too late once torch has loaded: left alone, not pretended
