"""One exit-status and error-line convention for `tledge` and `tledge-runtime` (tledge_runtime.exits):
0 ok, 1 a check failed, 2 bad input/usage/environment, 130 interrupted; `error: <message> (<hint>)`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tledge_runtime.errors import CheckFailed, ImageError, MetadataError, TledgeError
from tledge_runtime.exits import BAD_INPUT, CHECK_FAILED, INTERRUPTED, error_line, exit_status

from ...datasets import make_dataset

LINE = re.compile(r"^error: .+ \(.+\)$")  # one line, message and hint


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout)


def test_statuses():
    from tledge_export.errors import ExportFailed, Failure

    assert exit_status(ExportFailed([Failure("int8", "over_budget", "drop 3 points")])) == CHECK_FAILED == 1
    assert exit_status(CheckFailed("reference set differs")) == 1
    for e in (TledgeError("x"), ImageError("x"), MetadataError("x")):
        assert exit_status(e) == BAD_INPUT == 2
    assert exit_status(KeyboardInterrupt()) == INTERRUPTED == 130
    assert error_line("bad \x1b[2J name", "fix it") == "error: bad \\x1b[2J name (fix it)"


@pytest.mark.parametrize("argv", [
    ["tledge", "evaluate", "/no/such.pt", "/no/data"],  # Click usage error
    ["tledge", "finetune", ".", "--epochs", "0"],
    ["tledge", "frobnicate"],
    ["tledge_runtime.cli", "predict"],  # argparse usage error
    ["tledge_runtime.cli", "predict", "m.onnx", "x.png", "--topk", "0"],
    ["tledge_runtime.cli", "frobnicate"],
    ["tledge_runtime.cli", "predict", "/no/such.onnx", "x.png"],  # a TledgeError
    ["tledge_runtime.cli", "info", "/no/such.onnx"],
])
def test_usage_and_input_errors_are_one_line_and_status_2_in_both_clis(argv):
    proc = _cli(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr.lower()


def test_a_data_error_in_tledge_is_status_2(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=3, classes=("red",))
    proc = _cli("tledge", "finetune", str(data), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and LINE.match(proc.stderr.strip()) and "only one class" in proc.stderr


# A real Ctrl-C while it works: once {started} exists (the command is at work), then {delay} seconds more. SIGINT's
# default is put back first, as a terminal has it: a job a script starts with `&` inherits SIGINT *ignored*, and
# Python then never raises KeyboardInterrupt (this test failed that way when the suite ran in the background).
_INTERRUPT = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)
def _interrupt():
    while not os.path.exists({started!r}):
        time.sleep(0.05)
    time.sleep({delay})
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=_interrupt, daemon=True).start()
{call}
"""


def test_ctrl_c_is_status_130_in_tledge(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=30)
    call = (f"from tledge.cli.main import main\nmain(['finetune', {str(data)!r}, '--out', {str(tmp_path / 'run')!r}, "
            "'--img-size', '32', '--epochs', '1000'])")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERRUPT.format(
        started=str(tmp_path / "run" / "last.pt"), delay=0.5, call=call))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted (") and "--resume" in last and "Traceback" not in proc.stderr


def test_ctrl_c_is_status_130_in_tledge_runtime(tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "runtime"))
    from PIL import Image
    from runtime_testkit import colour_image, write_model

    model = write_model(tmp_path / "m.onnx")
    image = tmp_path / "red.png"
    Image.fromarray(colour_image("red", 0)).save(image)
    call = (f"from tledge_runtime.cli import main\nsys.exit(main(['-q', 'predict', {str(model)!r}, "
            f"*[{str(image)!r}] * 100_000]))")  # far more work than the second before the signal
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERRUPT.format(
        started=str(model), delay=1.0, call=call))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: interrupted" and proc.stdout == ""
