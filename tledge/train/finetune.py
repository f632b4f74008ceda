"""``finetune(cfg) -> RunResult``: the whole fine-tuning job, the Python API behind `tledge finetune`.

Recipe (each step says why):
1. Decode every image once (:mod:`tledge.data.imagecache`, with the runtime's own preprocessing); bad files
   are skipped and counted.
2. AdaBN (``adapt_bn``), then the head warm-up on cached backbone features, then fine-tuning
   (:mod:`tledge.train.phases`).
3. ``best.pt`` is the epoch with the best validation accuracy; it is evaluated once on the test split
   at the end. ``last.pt`` after every epoch makes ``--resume`` lose nothing.

The run's state travels in one :class:`~tledge.train.run.Run` context (:mod:`tledge.train.run`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tledge import __version__
from tledge.errors import CheckpointError, ConfigError
from tledge.models import create_model
from tledge.report.metrics import confusion_matrix, report
from tledge.train import distributed as dist_utils
from tledge.train import runfolder
from tledge.train.checkpoint import load_checkpoint, save_checkpoint
from tledge.train.config import FinetuneConfig
from tledge.train.phases import adapt_bn, finetune_phase, head_phase
from tledge.train.run import Run, open_run
from tledge.train.runfolder import next_free_run_dir  # noqa: F401 - part of the API (demo, scripts)
from tledge_runtime.fileio import atomic_write

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "RunResult", "finetune", "resume", "next_free_run_dir"]


@dataclass
class RunResult:
    out: Path
    best: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Run the whole job described by ``cfg``; returns where everything went and the final metrics."""
    cfg.validate()
    if cfg.out and (Path(cfg.out) / "last.pt").exists():
        raise ConfigError(f"{cfg.out} already holds a run", hint="add --resume to continue it, or choose another --out")
    if cfg.out:
        runfolder.check_owned(Path(cfg.out))
    dist = dist_utils.setup(cfg.device)
    try:
        return _train(open_run(cfg, dist))
    finally:
        runfolder.stop_logging_to_files()
        dist_utils.teardown(dist)


def resume(out: str | Path) -> RunResult:
    """Continue the run in ``out`` from its ``last.pt``, with the config and preprocessing it was started with."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"{last}: nothing to resume", hint="pass the --out folder of an interrupted run")
    ckpt = load_checkpoint(last)
    if "state" not in ckpt:
        raise CheckpointError(f"{last}: has no training state to resume from", hint="resume from last.pt, not best.pt")
    cfg = replace(FinetuneConfig.from_dict(ckpt["config"]), out=str(out))
    cfg.validate()
    dist = dist_utils.setup(cfg.device)
    try:
        return _train(open_run(cfg, dist, resumed=ckpt))
    finally:
        runfolder.stop_logging_to_files()
        dist_utils.teardown(dist)


def _train(run: Run) -> RunResult:
    cfg, state = run.cfg, run.state
    if run.resumed is None and cfg.adapt_bn and cfg.weights != "none" and len(run.train) >= 2 * run.dist.world:
        adapt_bn(run)
    if state.epoch < cfg.head_epochs:
        head_phase(run)
    if state.epoch < cfg.epochs and not state.stopped_early(cfg):
        finetune_phase(run)
    dist_utils.barrier(run.dist)
    return _finish(run)


def _finish(run: Run) -> RunResult:
    """Evaluate best.pt on val and test, write metrics.json, history.csv and the plots."""
    cfg, out = run.cfg, run.out
    if run.dist.main:
        runfolder.remove_cache(out / "cache")
    best_path = out / "best.pt"
    best = load_checkpoint(best_path)
    results, splits, net = _evaluate_best(run, best)
    answers, detector, fitted = _fit_answers(run, splits, net)
    metrics = {
        "tledge_version": __version__, "arch": cfg.arch, "weights": cfg.weights, "best_epoch": run.state.best_epoch,
        "epochs_run": run.state.epoch, "classes": run.splits.classes, "images": run.splits.counts(),
        "skipped_images": runfolder.count_skipped(out),
        "train_seconds": round(sum(h["seconds"] for h in run.state.history), 1), **run.state.orientations(),
        **{f"{k}_accuracy": v["accuracy"] for k, v in results.items()}, "reports": results, "config": cfg.to_dict(),
        "answers": {**answers.to_dict(), **fitted}, "speed": run.speed.to_dict(),
    }
    if run.dist.main:
        _write_results(run, metrics, results)
        # Fold the final numbers into best.pt so `export` and `evaluate` see them without metrics.json.
        best["metrics"] = {**best.get("metrics", {}), **{f"{k}_accuracy": v["accuracy"] for k, v in results.items()}}
        best["answers"] = answers.to_dict()  # exported into every model: what its answers mean
        if detector is not None:
            best["ood"] = detector.to_checkpoint()  # the detector's arrays: the export puts them in the graph
        save_checkpoint(best_path, {k: v for k, v in best.items() if k not in ("format", "format_version")})
        _plot_calibration(run, splits.get("test"), answers.temperature)
    return RunResult(out=out, best=best_path, metrics=metrics, history=run.state.history)


def _fit_answers(run: Run, splits: dict[str, Any], net: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Calibration, operating point, conformal sets and the out-of-distribution detector (tledge.answers.fit):
    the detector on the training images as the device sees them, the thresholds on the validation split."""
    from tledge.answers.features import max_ood_bytes, split_outputs
    from tledge.answers.fit import Wanted, fit_answers

    cfg = run.cfg
    train = split_outputs(net, run.train.views[1], run.train.labels, run.normalize, batch_size=cfg.batch_size,
                          device=run.dist.device, desc="train features")
    wanted = Wanted(cfg.operating_point, cfg.coverage, cfg.ood_keep, max_ood_bytes=max_ood_bytes(net))
    return fit_answers(wanted, run.splits.classes, train, splits.get("val"), splits.get("test"))


def _evaluate_best(run: Run, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Classification reports of the best checkpoint on the val and test splits, each split's features and logits
    (:class:`tledge.answers.fit.Split`), and the model."""
    from tledge.answers.features import split_outputs

    cfg, dist, classes = run.cfg, run.dist, run.splits.classes
    model = create_model(cfg.arch, len(classes), "none", dropout=cfg.dropout)
    model.load_state_dict(best["state_dict"])
    model = model.to(dist.device, memory_format=torch.channels_last).eval()
    results: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    for name, data in (("val", run.val), ("test", run.test)):
        if len(data) == 0:
            continue
        splits[name] = split_outputs(model, data.images, data.labels, run.normalize, batch_size=cfg.batch_size,
                                     device=dist.device, desc=f"evaluate {name}")
        results[name] = report(confusion_matrix(data.labels, splits[name].logits.argmax(1), len(classes)), classes)
    return results, splits, model


def _plot_calibration(run: Run, test: Any, temperature: float) -> None:
    """calibration.png: the test split's reliability before and after the temperature."""
    if test is None or not len(test):
        return
    from tledge.answers.calibrate import reliability
    from tledge.report.plots import plot_reliability
    from tledge_runtime.answers.decision import probabilities

    curves = {"before (T = 1)": reliability(probabilities(test.logits, 1.0), test.labels),
              f"after (T = {temperature:.3g})": reliability(probabilities(test.logits, temperature), test.labels)}
    plot_reliability(curves, run.out / "calibration.png", title=f"test split, {len(test)} images")


def _write_results(run: Run, metrics: dict[str, Any], results: dict[str, Any]) -> None:
    from tledge.report.plots import plot_confusion, plot_curves

    out, classes = run.out, run.splits.classes
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    runfolder.write_history(out / "history.csv", run.state.history)
    plot_curves(run.state.history, out / "curves.png", title=f"{run.cfg.arch} on {Path(run.cfg.data).name}")
    final = "test" if "test" in results else "val"
    plot_confusion(results[final]["confusion"], classes, out / "confusion.png",
                   title=f"{final} split, accuracy {100 * results[final]['accuracy']:.2f}%")
