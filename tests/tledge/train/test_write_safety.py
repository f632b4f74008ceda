"""tledge writes only inside folders it owns and never replaces or deletes a file it did not create:
no writing through a link out of the dataset folder, no run in a folder that is not a tledge run, no
removal of a user's file that shares a model's name, and names with newlines or escape codes written
as one escaped line (or refused, for class names)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from tledge.cli.main import main
from tledge.data.folders import load_splits
from tledge.errors import ConfigError, DataError
from tledge.train.finetune import FinetuneConfig, finetune
from tledge.train.runfolder import RUN_MARKER

from ...datasets import TINY, grey_images, make_dataset


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``folder`` (links not followed): its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes() if not p.is_symlink() else os.readlink(p).encode(),
                                         p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


# ------------------------------------------------------------------ tledge data elpv


@pytest.fixture()
def elpv_first_cell():
    elpv = pytest.importorskip("elpv_dataset")
    labels = Path(elpv.__file__).parent / "data" / "labels.csv"
    return Path(labels.read_text().split()[0]).name  # cell0001.png


def test_elpv_overwrite_never_writes_through_a_link(tmp_path, elpv_first_cell):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work")
    (outside / "notes.csv").write_text("mine")
    before = _snapshot(outside)
    out = tmp_path / "elpv"
    for split in ("train", "test"):  # the cell lands in one of these; a link waits in each
        for cls in ("functional", "defective"):
            (out / split / cls).mkdir(parents=True)
            (out / split / cls / elpv_first_cell).symlink_to(outside / "thesis.tex")
    (out / "labels.csv").symlink_to(outside / "notes.csv")
    result = CliRunner().invoke(main, ["data", "elpv", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert _snapshot(outside) == before
    assert not (out / "labels.csv").is_symlink() and "probability" in (out / "labels.csv").read_text()
    written = [p for p in out.glob(f"*/*/{elpv_first_cell}") if not p.is_symlink()]
    assert len(written) == 1 and written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_elpv_refuses_a_sub_folder_that_links_outside(tmp_path, elpv_first_cell):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = tmp_path / "elpv"
    out.mkdir()
    (out / "test").symlink_to(outside, target_is_directory=True)
    result = CliRunner().invoke(main, ["data", "elpv", str(out), "--overwrite"])
    assert result.exit_code == 2 and "symbolic link" in result.output and result.output.startswith("error: ")
    assert not any(outside.iterdir())


# ------------------------------------------------------------------ tledge finetune --out


def test_finetune_refuses_a_folder_that_is_not_a_run_without_touching_it(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    mine = tmp_path / "mine"
    (mine / "cache").mkdir(parents=True)
    (mine / "cache" / "index.db").write_bytes(b"\x00" * 100)
    (mine / "best.pt").write_text("my own file, not a checkpoint")
    (mine / "train.log").write_text("my log")
    before = _snapshot(mine)
    result = CliRunner().invoke(main, ["finetune", str(data), "--out", str(mine), "--img-size", "32"])
    assert result.exit_code == 2, result.output
    assert "not a tledge run" in result.output and result.output.startswith("error: ")
    assert _snapshot(mine) == before
    with pytest.raises(ConfigError, match="not a tledge run"):
        finetune(FinetuneConfig(data=str(data), out=str(mine), **TINY))
    assert _snapshot(mine) == before


def test_finetune_refuses_a_file_as_out(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=4)
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "out"), **TINY))


def test_a_run_folder_is_marked_first(tiny_run):
    marker = json.loads((tiny_run.out / RUN_MARKER).read_text())
    assert marker["tledge"]


def test_a_run_keeps_user_files_in_cache_and_escapes_names_in_skipped_txt(tmp_path):
    """In a run folder (marked), the end-of-run cleanup removes tledge's image caches only; bad files whose
    names hold a newline, a tab or an escape code are one escaped line each in skipped.txt, counted right."""
    data = make_dataset(tmp_path / "data", per_class=8)
    bad = {"zero\nline.png": b"", "tab\there.jpg": b"not a jpeg", "esc\x1b[2J.png": b"\x89PNG garbage"}
    for name, blob in bad.items():
        (data / "red" / name).write_bytes(blob)
    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    (out / RUN_MARKER).write_text("{}")
    (out / "cache" / "keep.bin").write_bytes(b"mine")
    result = finetune(FinetuneConfig(data=str(data), out=str(out), **{**TINY, "epochs": 1, "freeze_epochs": 1}))
    assert (out / "cache" / "keep.bin").read_bytes() == b"mine"
    raw = (out / "skipped.txt").read_bytes()
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == len(bad) == result.metrics["skipped_images"]
    assert b"\x1b" not in raw and all(line.count("\t") == 2 for line in lines)
    names = {Path(line.split("\t")[0]).name for line in lines}
    assert names == {"zero\\nline.png", "tab\\there.jpg", "esc\\x1b[2J.png"}


@pytest.mark.parametrize("name", ["bad\nclass", "esc\x1b[31mred", "tab\tclass", "rtl\u202egnp"])
def test_a_class_name_with_control_characters_is_a_data_error(tmp_path, name):
    data = make_dataset(tmp_path / "data", per_class=4, classes=("red", "green"))
    (data / "red").rename(data / name)
    with pytest.raises(DataError, match="control characters") as e:
        load_splits(data)
    assert "rename" in e.value.hint
    result = CliRunner().invoke(main, ["finetune", str(data), "--out", str(tmp_path / "run"), "--img-size", "32"])
    assert result.exit_code == 2 and "control characters" in result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ tledge export


def _plain_onnx(path: Path, producer: str = "") -> Path:
    """A real, valid ONNX file that some other tool wrote."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    model.producer_name = producer
    onnx.save(model, str(path))
    return path


def test_remove_stale_and_save_onnx_touch_only_files_tledge_wrote(tmp_path):
    from tledge_export import artifact

    user = _plain_onnx(tmp_path / "model.int8.onnx", producer="pytorch")
    text = tmp_path / "model.fp16.onnx"
    text.write_text("my notes, unluckily named")
    link = tmp_path / "model.onnx"
    ours = _plain_onnx(tmp_path / "elsewhere.onnx", producer=artifact.PRODUCER)
    link.symlink_to(ours)
    before = _snapshot(tmp_path)
    for path in (user, text, link):
        assert not artifact.written_by_tledge(path)
        artifact.remove_stale(path)
        with pytest.raises(artifact.ExportError, match="not written by tledge export"):
            artifact.save_onnx(onnx.load(str(ours)), path)
    assert _snapshot(tmp_path) == before
    assert artifact.written_by_tledge(ours)
    artifact.save_onnx(onnx.load(str(ours)), ours)  # tledge's own file is replaced
    artifact.remove_stale(ours)
    assert not ours.exists()


def test_a_failed_export_leaves_a_users_same_named_file_alone(tiny_run, tmp_path):
    calib = grey_images(tmp_path / "grey", 4)
    out = tmp_path / "out"
    out.mkdir()
    stray = _plain_onnx(out / "model.int8.onnx", producer="my-quantizer")
    refused = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--workers", "2"])
    assert refused.exit_code == 2 and "not a tledge export" in refused.output  # a foreign folder: refused, untouched
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx"]
    stray.unlink()
    first = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--workers", "2"])
    assert first.exit_code == 0, first.output  # now tledge's export folder
    user = _plain_onnx(out / "model.int8.onnx", producer="my-quantizer")  # a user's file put into it later
    before = user.read_bytes()
    result = CliRunner().invoke(main, ["export", str(tiny_run.best), "--out", str(out), "--int8", "--calib",
                                       str(calib), "--budget", "0", "--min-agreement", "100",
                                       "--max-float-nodes", "0", "--workers", "2"])
    assert result.exit_code == 1, result.output  # the int8 check failed: status 1
    assert "int8" in result.output and "left" in result.output and "not one tledge wrote" in result.output
    assert user.read_bytes() == before
    assert (out / "model.onnx").is_file()  # fp32 passed and was written
