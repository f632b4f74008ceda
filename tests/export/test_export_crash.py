"""A crash mid-export leaves complete model files only: never a truncated one under a model's name.

The formats are written one by one, each atomically, so a process killed at any moment
leaves the formats it finished (complete, verified) and nothing under the name of the one
it was working on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from tledge_export.artifact import read_meta, save_onnx
from tledge_runtime import fileio


def _assert_only_complete_models(folder: Path) -> list[str]:
    """Every visible file is a complete, verified model (or the report); anything else is a hidden .tmp."""
    names = []
    for path in sorted(folder.iterdir()):
        if path.name == ".tledge-export":  # the folder's ownership marker, written first
            continue
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path  # atomic_write's temporary, never read as a model
            continue
        names.append(path.name)
        if path.suffix == ".onnx":
            onnx.checker.check_model(onnx.load(str(path)))
            assert read_meta(path).verification.passed
    return names


def test_failure_inside_a_write_leaves_no_file(tmp_path, monkeypatch):
    """A model write that dies half-way (disk full at fsync) leaves neither the model nor its temporary."""
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_onnx(model, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_onnx(model, tmp_path / "model.onnx")
    assert onnx.load(str(tmp_path / "model.onnx")).graph.node[0].op_type == "Identity"


def test_sigkill_mid_export_leaves_only_complete_models(tiny_run, tmp_path):
    out = tmp_path / "out"
    code = ("import sys; from tledge.cli.main import main; "
            f"main(['export', {str(tiny_run.best)!r}, '--out', {str(out)!r}, '--fp16', '--int8', '--workers', '1'])")
    env = {**os.environ, "TLEDGE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "model.onnx").exists():  # kill it while it works on fp16 / int8
            assert proc.poll() is None, "export ended before it could be killed"
            assert time.monotonic() < deadline, "fp32 never appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    names = _assert_only_complete_models(out)
    assert "model.onnx" in names and "report.json" not in names
