"""`tledge evaluate CHECKPOINT DATA`: accuracy, per-class precision/recall/F1, the confusion matrix, and
(``predictions=FILE.csv``) every image's probabilities, to inspect mistakes and to check a device's
numbers against PyTorch's from outside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tledge.data.folders import Sample, scan_class_folders
from tledge.data.imagecache import decode_images, summarize_skipped
from tledge.evaluation.predictions import write_predictions
from tledge.errors import DataError
from tledge.report.metrics import confusion_matrix, report
from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
from tledge.train.distributed import resolve_device
from tledge.train.loops import infer
from tledge.train.transforms import Normalize


@dataclass
class EvalResult:
    report: dict[str, Any]  # see tledge.report.metrics.report
    skipped: list[tuple[Path, str, str]]
    skipped_line: str
    data: Path
    plot: Optional[Path] = None
    predictions: Optional[Path] = None


def evaluation_samples(data: Path, labels: list[str], split: Optional[str] = None) -> tuple[Path, list[Sample]]:
    """Images of ``data`` (a class folder, or the ``split`` / test / val sub-folder of a split layout)
    labelled by the checkpoint's class order. Class folders the model does not know are an error."""
    data = Path(data)
    if split:
        data = data / split
    elif (data / "train").is_dir():
        data = data / ("test" if (data / "test").is_dir() else "val")
    if not data.is_dir():
        raise DataError(f"{data}: no such folder", hint="pass a folder laid out as DATA/<class>/<images>")
    found = scan_class_folders(data)
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise DataError(f"{data}: class folder(s) {', '.join(unknown)} are not classes of this model ({', '.join(labels)})",
                        hint="rename the folders to the model's class names")
    return data, [Sample(p, labels.index(c)) for c in sorted(found) for p in found[c]]


def evaluate(checkpoint: Path, data: Path, *, split: Optional[str] = None, batch_size: int = 32,
             device: str = "auto", workers: int = 4, plot: Optional[Path] = None,
             predictions: Optional[Path] = None) -> EvalResult:
    """Evaluate a tledge checkpoint on an image folder with the checkpoint's own preprocessing.

    ``predictions``: also write a CSV with one row per image (see :mod:`tledge.evaluation.predictions`).
    """
    ckpt = load_checkpoint(checkpoint)
    labels = list(ckpt["labels"])
    prep = preprocess_of(ckpt)
    folder, samples = evaluation_samples(data, labels, split)
    decoded = decode_images(samples, prep, workers=workers, desc="decode")
    if len(decoded) == 0:
        raise DataError(f"{folder}: none of the {len(samples)} images could be read", hint="see the skipped files")
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev, memory_format=torch.channels_last)
    logits = infer(model, decoded.images, Normalize(prep, dev), batch_size=batch_size, device=dev, desc="evaluate")
    r = report(confusion_matrix(decoded.labels, logits.argmax(1).numpy(), len(labels)), labels)
    result = EvalResult(r, decoded.skipped, summarize_skipped(decoded.skipped, len(samples)), folder)
    if predictions is not None:
        probs = torch.softmax(logits.double(), dim=1).numpy()
        result.predictions = write_predictions(predictions, decoded.paths, decoded.labels, probs, labels)
    if plot is not None:
        from tledge.report.plots import plot_confusion

        result.plot = plot_confusion(r["confusion"], labels, plot, title=f"{folder.name}: accuracy {100 * r['accuracy']:.2f}%")
    return result
