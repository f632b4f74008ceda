"""Frames from iterators and real video files; batching; temporal smoothing; the example app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_testkit import colour_image

from tledge_runtime.errors import ImageError, TledgeError
from tledge_runtime.video import ScoreSmoother, classify_frames, read_frames

EXAMPLE = Path(__file__).resolve().parents[2] / "runtime" / "examples" / "classify_video.py"
SEQUENCE = ["red"] * 6 + ["blue"] * 6  # what the test video shows


def _frames(rgb: bool = True) -> list[np.ndarray]:
    frames = [colour_image(name, seed=i, size=(48, 32)) for i, name in enumerate(SEQUENCE)]
    return frames if rgb else [np.ascontiguousarray(f[:, :, ::-1]) for f in frames]


@pytest.fixture(scope="module")
def video_file(tmp_path_factory) -> Path:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 32))
    assert writer.isOpened()
    for frame in _frames(rgb=False):  # OpenCV writes BGR
        writer.write(frame)
    writer.release()
    return path


def test_iterator_of_rgb_frames(classifier):
    results = list(classify_frames(classifier, iter(_frames())))
    assert [r.index for r in results] == list(range(len(SEQUENCE)))
    assert [r.prediction.label for r in results] == SEQUENCE
    assert results[3].frame.shape == (32, 48, 3)


def test_bgr_iterator_needs_channel_order(classifier):
    bgr = _frames(rgb=False)
    assert [r.prediction.label for r in classify_frames(classifier, bgr, channel_order="bgr")] == SEQUENCE
    assert [r.prediction.label for r in classify_frames(classifier, bgr)][0] == "blue"  # read as RGB: red looks blue


@pytest.mark.parametrize("batch_size", [2, 5, 12, 50])
def test_batching_gives_the_same_results(classifier, batch_size):
    single = list(classify_frames(classifier, _frames()))
    batched = list(classify_frames(classifier, _frames(), batch_size=batch_size))
    assert [r.index for r in batched] == [r.index for r in single]
    np.testing.assert_allclose(np.stack([r.scores for r in batched]), np.stack([r.scores for r in single]), atol=1e-6)


def test_smoothing_delays_the_switch_and_matches_an_ema(classifier):
    raw = np.stack([r.scores for r in classify_frames(classifier, _frames())])
    smoothed = list(classify_frames(classifier, _frames(), smoothing=0.8, batch_size=3))
    expected = raw[0].copy()
    for i, r in enumerate(smoothed):
        if i:
            expected = 0.8 * expected + 0.2 * raw[i]
        np.testing.assert_allclose(r.scores, expected, atol=1e-9)
    labels = [r.prediction.label for r in smoothed]
    assert labels[:6] == ["red"] * 6
    assert labels[6] == "red" and labels[-1] == "blue"  # the first blue frame does not flip the label yet


def test_smoother_validation_and_reset():
    for bad in (-0.1, 1.0, "0.5"):
        with pytest.raises(TledgeError):
            ScoreSmoother(bad)
    s = ScoreSmoother(0.5)
    s.update(np.array([1.0, 0.0]))
    assert s.update(np.array([0.0, 1.0])).tolist() == [0.5, 0.5]
    s.reset()
    assert s.update(np.array([0.0, 1.0])).tolist() == [0.0, 1.0]


def test_max_frames_and_bad_batch_size(classifier):
    assert len(list(classify_frames(classifier, _frames(), max_frames=5, batch_size=2))) == 5
    with pytest.raises(TledgeError):
        list(classify_frames(classifier, _frames(), batch_size=0))


def test_bad_frame_in_a_stream_is_an_image_error(classifier):
    frames = _frames()[:3] + [np.zeros((3, 32, 48), np.uint8)]
    with pytest.raises(ImageError):
        list(classify_frames(classifier, frames))


def test_video_file_through_opencv(classifier, video_file):
    results = list(classify_frames(classifier, video_file, batch_size=4))  # OpenCV sources are BGR by default
    assert [r.prediction.label for r in results] == SEQUENCE
    assert len(list(read_frames(str(video_file)))) == len(SEQUENCE)


def test_stopping_early_releases_the_capture(classifier, video_file):
    stream = classify_frames(classifier, video_file)
    assert next(stream).prediction.label == "red"
    stream.close()  # must not raise; the capture is released in the generator's finally


def test_unreadable_video_sources(tmp_path):
    pytest.importorskip("cv2")
    with pytest.raises(ImageError) as e:
        list(read_frames(tmp_path / "missing.mp4"))
    assert "no such video file" in e.value.message
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("hello")
    with pytest.raises(ImageError) as e:
        list(read_frames(not_video))
    assert "cannot open" in e.value.message and e.value.hint


def test_example_app_classifies_a_video_and_reports_fps(models, video_file):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(models["fp32"]), str(video_file), "--smoothing", "0.5",
                           "--batch", "2", "--every", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["frame", "0", "red"]
    assert lines[-1].startswith(f"{len(SEQUENCE)} frames in ") and "FPS on ort-cpu" in lines[-1]
    assert len(lines) == 1 + len(range(0, len(SEQUENCE), 3))


def test_example_app_error_is_one_line(models, tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(models["fp32"]), str(tmp_path / "none.mp4")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
