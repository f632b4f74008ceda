"""The round trip issue 20 asks for: a device keeps what it answered unknown or unsure (--capture), a person sorts
the kept files into class folders, and they fine-tune a new model with them."""

from __future__ import annotations

import shutil

import numpy as np

from ...datasets import COLOURS, TINY


def test_captured_inputs_sorted_into_classes_fine_tune_again(answered_run, answered_export, tmp_path):
    from PIL import Image

    from tledge.train.finetune import FinetuneConfig, finetune
    from tledge_runtime import Classifier

    rng = np.random.default_rng(0)
    frames = []
    for a, b in (("red", "green"), ("green", "blue"), ("blue", "red")):  # two colours at once: sets of two, unsure
        for _ in range(6):
            frame = np.zeros((40, 48, 3), np.float64)
            frame[:, :24], frame[:, 24:] = COLOURS[a], COLOURS[b]
            frames.append(np.clip(frame + rng.normal(0, 20, frame.shape), 0, 255).astype(np.uint8))
    frames += [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)]  # noise: unknown
    captured = tmp_path / "captured"
    with Classifier(answered_export.get("fp32").path, capture=captured) as clf:
        answers = clf.predict_batch(frames)
    flagged = [a for a in answers if a.unknown or a.unsure]
    kept = sorted(captured.rglob("*.png"))
    assert flagged and len(kept) == len({f.tobytes() for f, a in zip(frames, answers) if a.unknown or a.unsure})

    # The person: each kept picture goes into the class folder of its left half's colour, next to the old data.
    data = tmp_path / "data"
    shutil.copytree(answered_run.metrics["config"]["data"], data)
    for path in kept:
        pixels = np.asarray(Image.open(path), dtype=np.float64)[:, :24].mean(axis=(0, 1))
        label = min(COLOURS, key=lambda c: np.abs(pixels - np.array(COLOURS[c])).sum())
        shutil.copy(path, data / "train" / label / f"captured-{path.name}")
    run = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "run2"), **TINY))
    assert run.metrics["images"]["train"] == 60 + len(kept) and run.best.is_file()
