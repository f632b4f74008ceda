"""Classifier(capture=DIR) / --capture: inputs answered unknown or unsure are kept for a person to sort, named by
content, bounded, atomic, never through a link; a folder that cannot be written fails at start; a full disk
pauses capture and predictions go on."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_testkit import colour_image, write_answered_model

from tledge_runtime import Classifier
from tledge_runtime.answers import capture as capture_module
from tledge_runtime.answers.capture import Capture, folder_name
from tledge_runtime.errors import TledgeError

GREY = np.full((30, 30, 3), 128, np.uint8)  # colourless: "unknown"
ORANGE = np.array([[[200, 150, 40]] * 30] * 30, np.uint8)  # red and green both plausible: "unsure" at 0.8


@pytest.fixture
def model(tmp_path) -> Path:
    return write_answered_model(tmp_path / "answered.onnx", set_threshold=0.8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_unknown_and_unsure_inputs_are_kept_with_a_json_line_each(model, tmp_path):
    out = tmp_path / "captured"
    with Classifier(model, capture=out) as clf:
        red, grey, orange = clf.predict_batch([colour_image("red", 0), _png(GREY), ORANGE])
    assert not red.unknown and not red.unsure and grey.unknown and orange.unsure and not orange.unknown
    kept = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(kept) == 4 and {p.parts[0] for p in kept} == {"unknown", "red"}
    grey_file = out / "unknown" / (hashlib.sha256(_png(GREY)).hexdigest()[:32] + ".png")
    assert grey_file.read_bytes() == _png(GREY)  # bytes as received, named by their content
    record = json.loads(grey_file.with_suffix(".json").read_text())
    assert record["unknown"] is True and record["file"] == grey_file.name and len(record["model_sha256"]) == 64
    assert set(record["scores"]) == {"red", "green", "blue"} and record["time"].endswith("Z")
    unsure = json.loads(next((out / "red").glob("*.json")).read_text())
    assert unsure["unsure"] is True and unsure["candidates"] == ["red", "green"]
    assert np.array_equal(np.asarray(Image.open(next((out / "red").glob("*.png")))), ORANGE)


def test_a_bgr_frame_is_kept_as_the_scene_looks(model, tmp_path):
    out = tmp_path / "captured"
    with Classifier(model, capture=out) as clf:
        clf.predict(np.ascontiguousarray(ORANGE[:, :, ::-1]), channel_order="bgr")
    assert np.array_equal(np.asarray(Image.open(next((out / "red").glob("*.png")))), ORANGE)


def test_capture_is_bounded_oldest_dropped_first(model, tmp_path):
    out = tmp_path / "captured"
    c = Capture(out, max_files=3)
    with Classifier(model) as clf:
        for level in range(100, 106):
            frame = np.full((20, 20, 3), level, np.uint8)
            c.offer(frame, clf.predict(frame), clf.scores(frame), clf.labels)
    kept = sorted(p for p in (out / "unknown").glob("*.png"))
    assert len(kept) == 3 and len(list((out / "unknown").glob("*.json"))) == 3
    levels = sorted(int(np.asarray(Image.open(p))[0, 0, 0]) for p in kept)
    assert levels == [103, 104, 105]
    big = Capture(tmp_path / "small", max_file_bytes=40)
    with Classifier(model) as clf:
        assert big.offer(_png(GREY), clf.predict(GREY), clf.scores(GREY), clf.labels) is None  # over the file limit


def test_a_restarted_capture_counts_what_is_there(model, tmp_path):
    out = tmp_path / "captured"
    with Classifier(model) as clf:
        first = Capture(out, max_files=2)
        for level in (10, 20):
            frame = np.full((20, 20, 3), level, np.uint8)
            first.offer(frame, clf.predict(frame), clf.scores(frame), clf.labels)
        second = Capture(out, max_files=2)
        frame = np.full((20, 20, 3), 30, np.uint8)
        second.offer(frame, clf.predict(frame), clf.scores(frame), clf.labels)
    assert len(list((out / "unknown").glob("*.png"))) == 2


def test_links_are_refused_or_replaced_never_followed(model, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = tmp_path / "linked"
    linked.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(TledgeError, match="is a link"):
        Classifier(model, capture=linked)
    out = tmp_path / "captured"
    c = Capture(out)
    (out / "unknown").symlink_to(elsewhere, target_is_directory=True)  # planted after start
    with Classifier(model) as clf:
        answer = clf.predict(GREY)
        assert c.offer(GREY, answer, clf.scores(GREY), clf.labels) is None
    assert list(elsewhere.iterdir()) == []


def test_an_unwritable_folder_fails_at_start_with_a_hint(model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TledgeError) as e:
        Classifier(model, capture=blocker / "captured")
    assert "cannot be written" in e.value.message and e.value.hint


def test_a_full_disk_pauses_capture_and_predictions_go_on(model, tmp_path, monkeypatch, caplog):
    out = tmp_path / "captured"
    with Classifier(model, capture=out) as clf:
        calls = []

        def full(path, data):
            calls.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(capture_module, "atomic_write", full)
        with caplog.at_level(logging.WARNING, logger="tledge_runtime"):
            answers = [clf.predict(np.full((20, 20, 3), v, np.uint8)) for v in (50, 60, 70)]
    assert all(a.unknown for a in answers)  # predictions went on
    assert len(calls) == 1  # the first failure paused capture; the others did not try
    lines = [r.message for r in caplog.records if "capture paused" in r.message]
    assert len(lines) == 1 and "No space left on device" in lines[0]


@pytest.mark.parametrize("label, name", [("red", "red"), ("a/b", "a_b"), ("..", "_"), ("../../etc", "_.._etc"),
                                          ("café au lait", "café_au_lait")])
def test_labels_become_folder_names_that_stay_inside(label, name):
    assert folder_name(label) == name and "/" not in folder_name(label)
