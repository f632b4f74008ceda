"""Model files as an attacker would write them: metadata nested 100,000 deep, metadata that asks for an
80,000-pixel resize or a million labels, labels holding terminal escape codes, engine files of gigabytes.
Each is a MetadataError or ModelError with a hint (one `error:` line from the CLI, exit status 2), never a
RecursionError, a MemoryError, a whole-file read or raw control characters on the reader's terminal."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from runtime_testkit import make_meta, meta_dict, write_model

from tledge_runtime import Classifier
from tledge_runtime.backends.engine_file import MAGIC, read_engine, read_engine_meta, write_engine
from tledge_runtime.backends.loader import read_meta
from tledge_runtime.cli import main
from tledge_runtime.errors import MetadataError, ModelError
from tledge_runtime.model.meta import (
    MAX_JSON_DEPTH,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_RESIZE_SIDE,
    MAX_SIDE,
    ModelMeta,
    Preprocess,
    json_depth,
)
from tledge_runtime.text import printable

DEEP = 100_000


def _doc(**changes) -> str:
    return json.dumps(meta_dict(**changes))


def _refused(text: str, fragment: str) -> MetadataError:
    with pytest.raises(MetadataError) as e:
        ModelMeta.from_json(text)
    assert fragment in e.value.message, e.value.message
    assert e.value.hint
    return e.value


# ------------------------------------------------------------------ depth


@pytest.mark.parametrize("text", [
    "[" * DEEP + "]" * DEEP,
    "{" + '"a":{' * DEEP + "}" * DEEP + "}",
    _doc().replace('"precision"', '"x":' + "[" * DEEP + "]" * DEEP + ',"precision"'),
    _doc().replace('"precision"', '"x":' + "[" * DEEP + ',"precision"'),  # unclosed as well
])
def test_deep_nesting_is_refused_before_json_loads_recurses(text):
    _refused(text, f"nests more than {MAX_JSON_DEPTH} levels")


def test_brackets_inside_strings_do_not_count_as_nesting():
    labels = ["[" * 50, "{" * 50 + '"\\"]]]', "b"]
    meta = ModelMeta.from_json(_doc(labels=labels))
    assert list(meta.labels) == labels
    assert json_depth('{"a": "[[[[\\"]]"}') == 1 and json_depth("3") == 0


VERIFICATION = {"images": 4, "max_abs_diff": 0.1, "mean_abs_diff": 0.01, "agreement": 1.0, "accuracy_reference": 0.75,
                "accuracy": 0.75, "budget": {"kind": "accuracy", "max_drop_points": 1.0, "min_agreement": 99.0},
                "passed": True, "failures": [], "backend": "onnxruntime", "reference": "PyTorch", "data": "held-out",
                "measured": "2026-11-28T00:00:00+00:00", "flips": {"to_correct": 0, "to_wrong": 0, "wrong_to_wrong": 0},
                "mcnemar_p": 1.0, "per_class": [{"label": "red", "images": 4, "accuracy_reference": 0.75,
                                                 "accuracy": 0.75}]}


def test_deep_or_foreign_verification_is_refused_everywhere(tmp_path, capsys):
    nested: dict = {}
    node = nested
    for _ in range(10):  # within the document's depth limit: the typed reader refuses the shape
        node["x"] = {}
        node = node["x"]
    text = _doc(verification={**VERIFICATION, "budget": nested})
    _refused(text, "unknown verification budget metadata field(s) ['x']")
    _refused(_doc(verification=nested), "unknown verification field(s) ['x']")
    path = write_model(tmp_path / "deep.onnx", meta_json=text)
    with pytest.raises(MetadataError):
        Classifier(path)
    assert main(["-q", "info", str(path), "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "verification budget" in err[0]


def test_verification_size_and_strings_are_bounded():
    _refused(_doc(verification={**VERIFICATION, "failures": ["x"] * 100_001}), "failures must be a list of at most")
    _refused(_doc(verification={**VERIFICATION, "backend": "x" * 5000}), "backend must be a string of at most 4096")
    _refused(_doc(verification={**VERIFICATION, "agreement": 7}), "agreement must be in 0..1")
    _refused(_doc(verification={**VERIFICATION, "flips": {"to_wrong": -1}}), "flips must be counts")
    assert ModelMeta.from_json(_doc(verification=VERIFICATION)).verification.per_class[0].label == "red"


@pytest.mark.parametrize("surface", ["api", "classifier", "info", "predict"])
def test_deep_metadata_in_a_model_file_is_one_error_line(tmp_path, surface, capsys):
    path = write_model(tmp_path / "deep.onnx", meta_json="[" * DEEP + "]" * DEEP)
    if surface == "api":
        with pytest.raises(MetadataError, match="nests more than"):
            read_meta(path)
    elif surface == "classifier":
        with pytest.raises(MetadataError, match="nests more than"):
            Classifier(path)
    else:
        argv = ["info", str(path)] if surface == "info" else ["predict", str(path), str(tmp_path / "x.png")]
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "nests more than" in err[0]


# ------------------------------------------------------------------ ranges that imply allocations


@pytest.mark.parametrize("preprocess, fragment", [
    ({"height": 8192, "width": 8192}, f"out of range 8..{MAX_SIDE}"),
    ({"height": 1024, "width": 1024, "crop_ratio": 0.1}, f"more than {MAX_RESIZE_SIDE}"),  # a 10,240-px resize
    ({"height": MAX_SIDE, "width": MAX_SIDE, "crop_ratio": 0.45}, "resizes the shorter side to 4551"),
    ({"height": True, "width": 16}, "must be integers"),
    ({"std": [1e-300, 1, 1]}, "std values"),
    ({"mean": [1e300, 0, 0]}, "mean values"),
    ({"scale": 1e30}, "scale"),
])
def test_metadata_cannot_ask_for_absurd_sizes(preprocess, fragment):
    doc = meta_dict()
    doc["preprocess"].update(preprocess)
    _refused(json.dumps(doc), fragment)


def test_the_largest_allowed_resize_is_within_the_bound():
    p = Preprocess(height=MAX_SIDE, width=MAX_SIDE, crop_ratio=0.5)
    assert p.resize_size == MAX_RESIZE_SIDE


@pytest.mark.parametrize("changes, fragment", [
    ({"labels": [f"c{i}" for i in range(MAX_LABELS + 1)]}, "labels, more than"),
    ({"labels": ["a", "b" * (MAX_LABEL_CHARS + 1)]}, f"1..{MAX_LABEL_CHARS} characters"),
    ({"labels": ["a", ""]}, "1..256 characters"),
    ({"labels": ["ok", "\x1b]0;pwned\x07"]}, "control characters (\\x1b, \\x07)"),
    ({"labels": ["ok", "two\nlines"]}, "control characters (\\n)"),
    ({"labels": ["ok", "rtl\u202eexe.txt"]}, "\\u202e"),
    ({"labels": ["ok", "\udcff"]}, "\\xff"),
    ({"provenance": {"architecture": "x" * 5000}}, "at most 1024 characters"),
    ({"provenance": {"architecture": {"nested": 1}}}, "provenance architecture must be"),
    ({"provenance": {"architecture": "r", "created": "\x1b[2J"}}, "control characters"),
    ({"provenance": {"architecture": "r", "opset": "18"}}, "opset"),
    ({"input": {"name": "i" * 5000}}, "input name"),
    ({"input": {"batch": True}}, "input batch"),
    ({"input": {"batch": 10**9}}, "input batch"),
    ({"output": {"name": ["logits"]}}, "output name"),
    ({"quantization": {"target": "cpu", "method": "minmax", "calibration_images": 10, "activation_type": "uint8",
                       "float_nodes": ["n"] * 200_000}}, "float_nodes"),
    ({"quantization": {"target": "cpu", "method": "minmax", "calibration_images": -1, "activation_type": "uint8"}},
     "calibration_images"),
    ({"precision": ["fp32"]}, "unknown precision"),
])
def test_strings_counts_and_types_are_bounded(changes, fragment):
    _refused(json.dumps(meta_dict(**changes)), fragment)


def test_unicode_labels_are_fine():
    labels = ["défaut", "正常", "🙂 ok", "a\\b"]
    assert ModelMeta.from_json(_doc(labels=labels)).labels == tuple(labels)


def test_a_model_asking_for_a_huge_resize_is_refused_at_load(tmp_path, capsys):
    doc = meta_dict()
    doc["preprocess"].update(height=2048, width=2048, crop_ratio=0.1)  # 20,480-px shorter side
    path = write_model(tmp_path / "huge.onnx", meta_json=json.dumps(doc))
    with pytest.raises(MetadataError, match="resizes the shorter side to 20480"):
        Classifier(path)
    assert main(["-q", "info", str(path)]) == 2
    assert "resizes the shorter side" in capsys.readouterr().err


# ------------------------------------------------------------------ engine files


def _sparse_engine(path, size: int):
    write_engine(path, make_meta(), b"plan")
    with open(path, "r+b") as f:
        f.truncate(size)  # a hole: gigabytes on paper, nothing on disk
    return path


def test_engine_header_is_read_without_the_body(tmp_path):
    path = _sparse_engine(tmp_path / "big.engine", 8 << 30)
    assert read_engine_meta(path) == make_meta()
    assert read_meta(path) == make_meta()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_info_on_a_multi_gigabyte_engine_reads_only_the_header(tmp_path):
    """`tledge-runtime info` on an 8 GB engine file: answered in well under a second and 200 MB of memory."""
    path = _sparse_engine(tmp_path / "big.engine", 8 << 30)
    # VmHWM is this process's own peak: ru_maxrss would also count the parent (pytest) it was forked from.
    code = textwrap.dedent(f"""
        import re, sys, time
        t0 = time.perf_counter()
        from tledge_runtime.cli import main
        status = main(["-q", "info", {str(path)!r}, "--json"])
        peak_kb = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
        print(status, peak_kb, time.perf_counter() - t0, file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    status, rss_kb, seconds = proc.stderr.split()[-3:]
    assert int(status) == 0, proc.stderr
    assert json.loads(proc.stdout)["meta"]["labels"] == list(make_meta().labels)
    assert int(rss_kb) < 200_000, f"peak RSS {int(rss_kb) / 1e3:.0f} MB"
    assert float(seconds) < 5


def test_engine_header_declaring_more_than_the_file_holds(tmp_path):
    path = tmp_path / "liar.engine"
    path.write_bytes(MAGIC + (1_000_000).to_bytes(4, "little") + b"{}")
    with pytest.raises(MetadataError, match="declares 1000000 bytes"):
        read_engine_meta(path)


def test_engine_metadata_errors_name_the_file(tmp_path):
    doc = ("[" * DEEP + "]" * DEEP).encode()
    path = tmp_path / "deep.engine"
    path.write_bytes(MAGIC + len(doc).to_bytes(4, "little") + doc + b"plan")
    with pytest.raises(MetadataError) as e:
        read_engine(path)
    assert str(path) in e.value.message and "nests more than" in e.value.message


# ------------------------------------------------------------------ printing names


def test_printable_escapes_what_drives_a_terminal():
    assert printable("red\x1b[2J\n\t\r\x07\x7f\x9b") == "red\\x1b[2J\\n\\t\\r\\x07\\x7f\\x9b"
    assert printable("a\u2028b\u202ec") == "a\\u2028b\\u202ec"
    assert printable("caf\udce9.png") == "caf\\xe9.png"  # a non-UTF-8 byte, as os.fsdecode gives it
    assert printable("défaut 正常 🙂 a\\b") == "défaut 正常 🙂 a\\b"


def test_predict_and_info_print_file_names_escaped(models, images, tmp_path, capsys):
    evil = tmp_path / "red\x1b]0;pwned\x07\nfake.png"
    evil.write_bytes(images["red"][0].read_bytes())
    model = tmp_path / "m\x1b[31m.onnx"
    model.write_bytes(models["fp32"].read_bytes())
    assert main(["-q", "predict", str(model), str(evil)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07\\nfake.png" in out
    assert len(out.splitlines()) == 2 and out.splitlines()[1].split()[1] == "red"
    assert main(["-q", "predict", str(model), str(evil), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["image"] == str(evil)  # JSON keeps the exact name, escaped
    assert main(["-q", "info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "m\\x1b[31m.onnx" in out
    missing = tmp_path / "gone\x1b[2J.png"
    assert main(["-q", "predict", str(model), str(missing)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "gone\\x1b[2J.png" in err


def test_escape_code_labels_are_refused_with_a_printable_error(tmp_path):
    doc = meta_dict(labels=["red", "green\x1b[2J\x1b]0;owned\x07", "blue"])
    path = write_model(tmp_path / "evil.onnx", meta_json=json.dumps(doc))
    with pytest.raises(MetadataError, match="control characters"):
        Classifier(path)
    exe = [sys.executable, "-m", "tledge_runtime.cli"]
    for argv in (["info", str(path)], ["predict", str(path), str(tmp_path / "x.png")]):
        proc = subprocess.run([*exe, *argv], capture_output=True, timeout=60)
        assert proc.returncode == 2 and b"\x1b" not in proc.stderr + proc.stdout
        assert proc.stderr.decode().startswith("error: ") and b"Traceback" not in proc.stderr


def test_a_graph_that_contradicts_its_metadata_is_still_a_model_error(tmp_path):
    doc = meta_dict()
    doc["preprocess"].update(height=MAX_SIDE, width=MAX_SIDE)  # valid ranges, the 16-px graph disagrees
    with pytest.raises(ModelError, match="metadata's preprocessing makes 2048x2048"):
        Classifier(write_model(tmp_path / "m.onnx", meta_json=json.dumps(doc)))


def _width_from_input_graph():
    """The colour classifier with ``batch`` extra output columns of large logits: the declared output shape is
    (batch, classes?) with a free width, so the load check passes; the real width is 3 + batch."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from runtime_testkit import build_graph

    model = build_graph("fp32")
    g = model.graph
    next(n for n in g.node if n.op_type == "Gemm").output[0] = "z"
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                          numpy_helper.from_array(np.array([1], np.int64), "one")])
    g.node.extend([helper.make_node("Shape", ["input"], ["shape"]),
                   helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
                   helper.make_node("Concat", ["n", "n"], ["nn"], axis=0),
                   helper.make_node("ConstantOfShape", ["nn"], ["big"],
                                    value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1000.0])),
                   helper.make_node("Concat", ["z", "big"], ["logits"], axis=1)])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "classes"]))
    return model


def test_an_output_width_that_depends_on_the_input_is_a_model_error_on_every_run(tmp_path, images):
    path = write_model(tmp_path / "width.onnx", graph=_width_from_input_graph())
    with Classifier(path, backend="ort-cpu") as clf:  # the declared shapes pass the load check
        for call in (lambda: clf.predict(images["red"][0]), lambda: clf.predict_batch(images["red"][:2])):
            with pytest.raises(ModelError, match=r"output of shape \(1, 4\)|output of shape \(2, 5\)") as e:
                call()
            assert "lists 3 labels" in str(e.value) and e.value.hint
