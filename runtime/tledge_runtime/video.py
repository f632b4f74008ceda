"""Classify a stream of frames: a video file, a camera, an RTSP URL, or any iterator of arrays.

OpenCV is optional (``pip install opencv-python-headless``) and only needed for
files, cameras and URLs; an iterator of ``HxWx3`` uint8 arrays works without it.
Frames can be batched (more throughput, a few frames more latency) and the scores
smoothed over time with an exponential moving average, which stops the label
flickering between two classes on a noisy camera.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

from tledge_runtime.classifier import Classifier, Prediction
from tledge_runtime.errors import ImageError, TledgeError

VideoSource = Union[str, os.PathLike, int, Iterable[np.ndarray]]


@dataclass(frozen=True)
class FramePrediction:
    """The prediction for one frame, after smoothing when smoothing is on."""

    index: int  # frame number from the start of the source, 0-based
    prediction: Prediction
    scores: np.ndarray  # per-class probabilities the prediction was taken from (smoothed)
    frame: np.ndarray  # the frame as the source gave it (BGR for OpenCV sources)


class ScoreSmoother:
    """Exponential moving average of per-class scores: ``s = smoothing * s + (1 - smoothing) * p``.

    ``smoothing=0`` passes scores through; 0.8 averages over roughly the last 5 frames.
    """

    def __init__(self, smoothing: float):
        if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise TledgeError(f"smoothing must be in [0, 1), got {smoothing!r}",
                              hint="0 turns smoothing off; 0.8 averages over about 5 frames")
        self.smoothing = float(smoothing)
        self._state: Optional[np.ndarray] = None

    def update(self, scores: np.ndarray) -> np.ndarray:
        if self._state is None or self.smoothing == 0.0:
            self._state = np.asarray(scores, dtype=np.float64).copy()
        else:
            self._state = self.smoothing * self._state + (1.0 - self.smoothing) * scores
        return self._state

    def reset(self) -> None:
        self._state = None


def read_frames(source: Union[str, os.PathLike, int]) -> Iterator[np.ndarray]:
    """Frames (BGR, HxWx3 uint8) from a video file, camera index or stream URL, via OpenCV."""
    try:
        import cv2
    except ImportError:
        raise ImageError("reading video needs OpenCV, which is not installed",
                         hint="pip install opencv-python-headless, or pass an iterator of frames",
                         kind="unreadable") from None
    if isinstance(source, (str, os.PathLike)) and "://" not in str(source):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such video file", hint="check the path", kind="missing")
    capture = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not capture.isOpened():
        capture.release()
        raise ImageError(f"{source}: OpenCV cannot open this video source",
                         hint="check the camera index or URL, or that the file is a video OpenCV can decode",
                         kind="unreadable")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()  # also runs when the consumer stops early (generator close)


def classify_frames(classifier: Classifier, source: VideoSource, *, batch_size: int = 1, smoothing: float = 0.0,
                    channel_order: str | None = None, max_frames: int | None = None) -> Iterator[FramePrediction]:
    """Yield one :class:`FramePrediction` per frame of ``source``, in order.

    ``source``: a file path, camera index or URL (read with OpenCV, BGR), or any
    iterable of HxWx3 uint8 arrays (RGB unless ``channel_order="bgr"``).
    ``batch_size``: frames sent to the model together. ``smoothing``: see :class:`ScoreSmoother`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TledgeError(f"batch_size must be a positive integer, got {batch_size!r}",
                          hint="use 1 for the lowest latency")
    smoother = ScoreSmoother(smoothing)
    if isinstance(source, (str, os.PathLike, int)):
        frames: Iterator[Any] = read_frames(source)
        order = channel_order or "bgr"
    else:
        frames = iter(source)
        order = channel_order or "rgb"
    index = 0
    pending: list[np.ndarray] = []
    try:
        for frame in frames:
            if max_frames is not None and index + len(pending) >= max_frames:
                break
            pending.append(frame)
            if len(pending) == batch_size:
                yield from _flush(classifier, pending, order, smoother, index)
                index += len(pending)
                pending = []
        if pending:
            yield from _flush(classifier, pending, order, smoother, index)
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # releases the OpenCV capture when the caller stops early


def _flush(classifier: Classifier, frames: list[np.ndarray], order: str, smoother: ScoreSmoother,
           start: int) -> Iterator[FramePrediction]:
    probs = classifier.infer(np.stack([classifier.prepare(f, order) for f in frames]))
    for i, (frame, row) in enumerate(zip(frames, probs)):
        smoothed = smoother.update(row)
        yield FramePrediction(start + i, classifier.answer(smoothed), smoothed, frame)
