"""`tledge evaluate CHECKPOINT DATA`: accuracy, per-class precision/recall/F1, the confusion matrix, and
(``predictions=FILE.csv``) every image's probabilities, to inspect mistakes and to check a device's
numbers against PyTorch's from outside."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch

from tledge.answers.operating_point import check_spec, choose, parse_spec
from tledge.data.folders import Sample, Splits, scan_class_folders
from tledge.data.imagecache import decode_images, summarize_skipped
from tledge.errors import DataError
from tledge.evaluation.predictions import write_predictions
from tledge.report.metrics import confusion_matrix, report
from tledge.train.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_of
from tledge.train.distributed import resolve_device
from tledge.train.loops import infer
from tledge.train.transforms import Normalize
from tledge_runtime.answers.decision import decide, probabilities
from tledge_runtime.model.answers import Answers, OperatingPoint


@dataclass
class EvalResult:
    report: dict[str, Any]  # see tledge.report.metrics.report
    skipped: list[tuple[Path, str, str]]
    skipped_line: str
    data: Path
    plot: Optional[Path] = None
    predictions: Optional[Path] = None
    operating_point: Optional[OperatingPoint] = None  # the checkpoint's, or the one --operating-point chose
    at_operating_point: Optional[dict[str, Any]] = None  # the report when deciding with it


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
             predictions: Optional[Path] = None, operating_point: Optional[str] = None) -> EvalResult:
    """Evaluate a tledge checkpoint on an image folder with the checkpoint's own preprocessing.

    Reports the most probable class, and the checkpoint's operating point when it has one; ``operating_point``
    (``"CLASS:recall=0.95"``) chooses a new one on the run's validation split instead (split.json next to the
    checkpoint). ``predictions``: also write a CSV with one row per image (:mod:`tledge.evaluation.predictions`).
    """
    ckpt = load_checkpoint(checkpoint)
    labels = list(ckpt["labels"])
    spec = parse_spec(operating_point) if operating_point is not None else None
    if spec is not None:
        check_spec(spec, labels)
    prep = preprocess_of(ckpt)
    folder, samples = evaluation_samples(data, labels, split)
    decoded = decode_images(samples, prep, workers=workers, desc="decode")
    if len(decoded) == 0:
        raise DataError(f"{folder}: none of the {len(samples)} images could be read", hint="see the skipped files")
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt).to(dev, memory_format=torch.channels_last)
    run = partial(infer, model, normalize=Normalize(prep, dev), batch_size=batch_size, device=dev)
    logits = run(decoded.images, desc="evaluate").double().numpy()
    r = report(confusion_matrix(decoded.labels, logits.argmax(1), len(labels)), labels)
    result = EvalResult(r, decoded.skipped, summarize_skipped(decoded.skipped, len(samples)), folder)
    answers = Answers.from_dict(ckpt["answers"]) if ckpt.get("answers") else Answers()
    if spec is not None:
        val = _run_validation(Path(checkpoint), labels, prep, workers)
        point, said = choose(spec, probabilities(run(val.images, desc="evaluate val").double().numpy(),
                                                 answers.temperature), val.labels, labels, "val split")
        if point is None:
            raise DataError(f"--operating-point {operating_point}: {said}", hint="choose a target the model can reach")
        answers = replace(answers, operating_point=point)
    probs = probabilities(logits, answers.temperature)
    if answers.operating_point is not None:
        result.operating_point = answers.operating_point
        decided = decide(probs, labels, answers.operating_point)
        result.at_operating_point = report(confusion_matrix(decoded.labels, decided, len(labels)), labels)
    if predictions is not None:
        result.predictions = write_predictions(predictions, decoded.paths, decoded.labels, probs, labels)
    if plot is not None:
        from tledge.report.plots import plot_confusion

        result.plot = plot_confusion(r["confusion"], labels, plot, title=f"{folder.name}: accuracy {100 * r['accuracy']:.2f}%")
    return result


def _run_validation(checkpoint: Path, labels: list[str], prep: Any, workers: int) -> Any:
    """The run's validation images (split.json next to the checkpoint), decoded: where thresholds are chosen."""
    saved = checkpoint.parent / "split.json"
    if not saved.is_file():
        raise DataError(f"{saved}: not found; --operating-point chooses its threshold on the run's validation split",
                        hint="evaluate the best.pt inside its run folder, next to split.json")
    splits = Splits.from_json(saved.read_text())
    if list(splits.classes) != labels or not splits.val:
        raise DataError(f"{saved}: no validation split of this checkpoint's classes",
                        hint="evaluate the best.pt of the run that wrote this split.json")
    val = decode_images(splits.val, prep, workers=workers, desc="decode val")
    if len(val) == 0:
        raise DataError(f"none of the run's {len(splits.val)} validation images can be read", hint="restore them")
    return val
