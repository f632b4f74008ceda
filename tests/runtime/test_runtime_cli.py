"""tledge-runtime predict / info: output formats, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from runtime_testkit import LABELS, make_meta

from tledge_runtime.backends.engine_file import write_engine
from tledge_runtime.cli import main


def test_predict_prints_a_table(models, images, capsys):
    files = [images["red"][0], images["green"][1], images["blue"][2]]
    assert main(["-q", "predict", str(models["fp32"]), *map(str, files)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["IMAGE", "LABEL", "SCORE"]
    assert [line.split()[1] for line in out[1:]] == ["red", "green", "blue"]
    assert all(0.5 < float(line.split()[2]) <= 1 for line in out[1:])


def test_predict_json_lines_with_topk(models, images, capsys):
    files = [images["blue"][0], images["red"][3]]
    assert main(["-q", "predict", str(models["baked"]), *map(str, files), "--json", "--topk", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in records] == ["blue", "red"]
    assert records[0]["image"] == str(files[0])
    assert [t["label"] for t in records[0]["topk"]][0] == "blue" and len(records[0]["topk"]) == 3
    assert records[0]["score"] == records[0]["topk"][0]["score"]


def test_predict_table_with_topk_column(models, images, capsys):
    assert main(["-q", "predict", str(models["fp32"]), str(images["green"][0]), "--topk", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["IMAGE", "LABEL", "SCORE", "TOP-K"]
    assert out[1].split()[3] == "green"


def test_bad_image_among_good_ones_reports_it_and_exits_2(models, images, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    code = main(["-q", "predict", str(models["fp32"]), str(images["red"][0]), str(bad), str(tmp_path / "gone.png")])
    captured = capsys.readouterr()
    assert code == 2
    assert [line.split()[1] for line in captured.out.splitlines()[1:]] == ["red"]  # the good one is still classified
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "bad.png" in errors[0] and "gone.png" in errors[1]


@pytest.mark.parametrize("argv_tail, expected", [
    (["predict", "{missing}", "{image}"], "no such model file"),
    (["predict", "{plain}", "{image}"], "no tledge metadata"),
    (["predict", "{model}", "{image}", "--backend", "ort-cuda", "--device", "cpu"], "error: "),
    (["info", "{missing}"], "no such model file"),
])
def test_user_errors_are_one_line_and_exit_2(models, images, tmp_path, capsys, argv_tail, expected):
    from runtime_testkit import write_model

    plain = write_model(tmp_path / "plain.onnx", no_meta=True)
    subs = {"{missing}": str(tmp_path / "missing.onnx"), "{plain}": str(plain), "{model}": str(models["fp32"]),
            "{image}": str(images["red"][0])}
    assert main(["-q", *[subs.get(a, a) for a in argv_tail]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert "(" in err[0] and err[0].endswith(")")  # the hint


def test_bad_options_are_rejected_by_argparse(models, images, capsys):
    for argv in (["predict", str(models["fp32"]), str(images["red"][0]), "--topk", "0"],
                 ["predict", str(models["fp32"]), str(images["red"][0]), "--backend", "tflite"],
                 ["serve", str(models["fp32"]), "--max-bytes", "-5"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_info_shows_metadata_and_backends(models, capsys):
    assert main(["-q", "info", str(models["fp32"])]) == 0
    out = capsys.readouterr().out
    assert "red, green, blue" in out and "16x16" in out and "crop ratio 0.875" in out
    assert "ort-cpu" in out and "auto picks    ort-cpu" in out


def test_info_json_for_onnx_and_engine_files(models, tmp_path, capsys):
    assert main(["-q", "info", str(models["fp16"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["meta"]["labels"] == list(LABELS)
    assert info["meta"]["precision"] == "fp16"
    names = {b["name"]: b for b in info["backends"]}
    assert set(names) == {"ort-tensorrt", "ort-cuda", "ort-cpu", "tensorrt", "openvino", "openvino-bf16"}
    assert names["ort-cpu"]["available"] is True
    engine = write_engine(tmp_path / "m.engine", make_meta(), b"plan")
    assert main(["-q", "info", str(engine), "--json"]) == 0  # no TensorRT needed to read the header
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "tensorrt-engine" and info["meta"]["labels"] == list(LABELS)


def test_console_script_has_no_traceback_on_errors(tmp_path):
    exe = shutil.which("tledge-runtime")
    argv = [exe] if exe else [sys.executable, "-m", "tledge_runtime.cli"]
    proc = subprocess.run([*argv, "predict", str(tmp_path / "x.onnx"), "y.png"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'x.onnx'}: no such model file (check the path)"
