"""The run context: what one fine-tuning run shares between its phases, built once, saved every epoch.

:func:`open_run` turns a :class:`~tledge.train.config.FinetuneConfig` (and, when resuming, the ``last.pt``
being continued) into a :class:`Run`: the folder, the split, the decoded images, the model, the RNGs
and the :class:`TrainState`. The phases in :mod:`tledge.train.phases` take the run and nothing else;
:func:`end_epoch` records each epoch and writes ``last.pt`` (and ``best.pt``) from it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from tledge import __version__
from tledge.answers.operating_point import check_spec, parse_spec
from tledge.data.folders import Splits, load_splits
from tledge.data.imagecache import DecodedImages, decode_images, require_every_class, summarize_skipped, train_geometry
from tledge.data.input_size import input_size, typical_short_side
from tledge.errors import ConfigError
from tledge.models import Net, create_model, default_preprocess
from tledge.train import distributed as dist_utils
from tledge.train import runfolder
from tledge.train.checkpoint import preprocess_of, save_checkpoint
from tledge.train.config import FinetuneConfig
from tledge.train.ema import WeightEMA
from tledge.train.speed.choice import PLAIN, SpeedChoice
from tledge.train.transforms import Normalize
from tledge_runtime.fileio import atomic_write
from tledge_runtime.model.meta import Preprocess

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """One epoch's training numbers (all processes together)."""

    loss: float
    acc: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class TrainState:
    """Where the run stands: what resuming needs beyond the weights, the optimizer and the RNGs."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed in fine-tuning (drives the LR schedule)
    best_acc: float = -1.0  # validation accuracy of the epoch best.pt holds
    best_epoch: int = 0
    best_loss: float = float("inf")  # that epoch's validation loss: breaks ties in accuracy
    top_acc: float = -1.0  # the highest validation accuracy of any epoch so far (best_acc is within one image of it)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (history.csv)
    # Which orientation changes training uses: the config's choice, or what "auto" decided (phases.decide_orientations)
    hflip: Optional[bool] = None  # mirror left-right
    vflip: Optional[bool] = None  # flip top-bottom
    rot90: Optional[bool] = None  # rotate by a multiple of 90 degrees

    def orientations(self) -> dict[str, Optional[bool]]:
        """``{"hflip": .., "vflip": .., "rot90": ..}``: what metrics.json and every checkpoint record."""
        return {"hflip": self.hflip, "vflip": self.vflip, "rot90": self.rot90}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "TrainState":
        """The state a last.pt holds (its ``phase`` aside). A last.pt from before ``top_acc`` kept the highest
        accuracy as best.pt's, so that is its top."""
        fields = {k: v for k, v in saved.items() if k != "phase"}
        fields.setdefault("top_acc", fields.get("best_acc", -1.0))
        return cls(**fields)

    def improves(self, val_acc: float, val_loss: float, one_image: float = 0.0) -> bool:
        """A validation accuracy higher than any epoch's so far; or a tie with it at a lower validation loss than
        best.pt's, where accuracies within ``one_image`` (one validation image's share) count as tied.

        On a validation split of a hundred or two images one image is 0.5-0.7 points: two epochs one image apart
        cannot be told apart by accuracy, and keeping the first such epoch kept an early one of the cosine
        schedule, at a higher learning rate. The tie goes to the epoch that fits the held-out images better (the
        lower loss), usually a later one; best.pt's accuracy stays within one image of the highest. Measured for
        issue 23 on the runs where both epochs were kept (RESULTS §12).
        """
        if val_acc > self.top_acc:
            return True
        return val_acc >= self.top_acc - one_image - 1e-6 and val_loss < self.best_loss  # float32 accuracies: ~1e-7 off

    def stopped_early(self, cfg: FinetuneConfig) -> bool:
        """``cfg.patience`` fine-tuning epochs in a row without a better validation accuracy."""
        if cfg.patience <= 0 or self.epoch <= cfg.head_epochs:
            return False
        return self.epoch - max(self.best_epoch, cfg.head_epochs) >= cfg.patience


@dataclass
class Run:
    """One fine-tuning run: configuration, process, folder, data, model and progress."""

    cfg: FinetuneConfig
    dist: dist_utils.Dist  # this process's rank and device (one process unless launched by torchrun)
    out: Path  # the run folder
    splits: Splits
    prep: Preprocess  # the eval preprocessing: what the exported model will be fed
    train: DecodedImages  # views[0]: stored larger, for augmentation; views[1]: at the model input
    val: DecodedImages
    test: DecodedImages
    model: Net
    normalize: Normalize
    state: TrainState
    shuffle_gen: torch.Generator  # the order of training images (same on every process)
    aug_gen: torch.Generator  # augmentation draws (one stream per process)
    resumed: Optional[dict[str, Any]] = None  # the last.pt this run continues, if any
    ema: Optional[WeightEMA] = None  # averaged weights while fine-tuning (--ema): what best.pt holds
    speed: SpeedChoice = PLAIN  # how the fine-tuning phase computes here (the probe's choice; in metrics.json)

    def optimizer_state(self, phase: str) -> Optional[dict[str, Any]]:
        """The saved optimizer state when the run was interrupted in ``phase`` ("head" or "finetune")."""
        ckpt = self.resumed
        if ckpt is None or not ckpt.get("optimizer") or ckpt["state"].get("phase") != phase:
            return None
        return ckpt["optimizer"]


def open_run(cfg: FinetuneConfig, dist: dist_utils.Dist, resumed: Optional[dict[str, Any]] = None) -> Run:
    """Folder, split, preprocessing, decoded images, model and RNGs of a new or resumed run."""
    out = Path(dist_utils.broadcast_object(dist, str(runfolder.run_dir(cfg.out))))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    splits = _splits_for(cfg, out, reuse=resumed is not None)  # bad data fails here, before any file is written
    if cfg.operating_point is not None:  # an operating point this data cannot have fails before training too
        check_spec(parse_spec(cfg.operating_point), splits.classes)
    if dist.main:
        _start_folder(cfg, dist, out, splits)
    # A resumed run keeps the preprocessing it was trained with, whatever the registry says today.
    prep = preprocess_of(resumed) if resumed is not None else _new_preprocess(cfg, splits)
    train, val, test = _decode_all(cfg, splits, prep, out, dist)
    model = create_model(cfg.arch, len(splits.classes), cfg.weights, dropout=cfg.dropout)
    model = model.to(dist.device, memory_format=torch.channels_last)
    run = Run(cfg, dist, out, splits, prep, train, val, test, model, Normalize(prep, dist.device), TrainState(),
              shuffle_gen=torch.Generator().manual_seed(cfg.seed),
              aug_gen=torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank + 1), resumed=resumed)
    if resumed is not None:
        _restore(run, resumed)
    run.speed = _choose_speed(run)
    return run


def _choose_speed(run: Run) -> SpeedChoice:
    """The probe (seconds, or a cache read): how this machine trains this run's fine-tuning phase; said once."""
    from tledge.train.speed.probe import choose

    cfg = run.cfg
    planned = max(0, cfg.epochs - max(run.state.epoch, cfg.head_epochs)) * len(run.train)  # images still to train
    example = run.normalize(torch.from_numpy(np.ascontiguousarray(run.train.views[1][:2])))  # two of its images
    choice = choose(unwrap(run.model), cfg, run.dist.device, run.prep.height, planned, run.dist.enabled, example)
    if run.dist.main:
        log.info("%s", choice.line())
    return choice


def _start_folder(cfg: FinetuneConfig, dist: dist_utils.Dist, out: Path, splits: Splits) -> None:
    runfolder.claim(out, cfg.data)
    runfolder.log_to_file(out / "train.log")
    log.info("run folder %s (tledge %s, torch %s, device %s, %d process(es))", out, __version__,
             torch.__version__, dist.device, dist.world)
    log.info("classes: %s; images: %s (%s split)", ", ".join(splits.classes),
             ", ".join(f"{k} {v}" for k, v in splits.counts().items()), splits.origin)
    atomic_write(out / "split.json", splits.to_json().encode())


def _restore(run: Run, ckpt: dict[str, Any]) -> None:
    run.model.load_state_dict(ckpt["state_dict"])
    run.state = TrainState.from_saved(ckpt["state"])
    run.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
    augment = ckpt["rng"]["augment"]
    if run.dist.rank < len(augment):
        run.aug_gen.set_state(augment[run.dist.rank])
    torch.set_rng_state(ckpt["rng"]["torch"])
    log.info("resuming after epoch %d of %d (best val accuracy so far %.2f%%)", run.state.epoch, run.cfg.epochs,
             100 * run.state.best_acc)


def _new_preprocess(cfg: FinetuneConfig, splits: Splits) -> Preprocess:
    """At ``--img-size``; without it at the arch's ImageNet size, or the images' own when they are smaller."""
    if cfg.img_size is not None:
        return default_preprocess(cfg.arch, cfg.img_size, cfg.crop_ratio)
    arch_size = default_preprocess(cfg.arch).height
    side = typical_short_side([s.path for s in splits.train], seed=cfg.seed)
    size = input_size(arch_size, side)
    if size != arch_size:
        log.info("input %d px: the training images are about %d px, smaller than %s's %d px, and upscaling adds no "
                 "detail (--img-size chooses)", size, side, cfg.arch, arch_size)
    return default_preprocess(cfg.arch, size, cfg.crop_ratio)


def _splits_for(cfg: FinetuneConfig, out: Path, *, reuse: bool) -> Splits:
    """The saved split of this run when resuming, else a new one (saved by the caller)."""
    saved = out / "split.json"
    if reuse and saved.is_file():  # a resumed run keeps its split, even if files were added to DATA since
        return Splits.from_json(saved.read_text())
    return load_splits(Path(cfg.data), val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed)


def _decode_all(cfg: FinetuneConfig, splits: Splits, prep: Preprocess, out: Path, dist: dist_utils.Dist
                ) -> tuple[DecodedImages, DecodedImages, DecodedImages]:
    cache = out / "cache"
    # Training images twice from one decode: larger for augmentation, and at exactly the model input (the
    # device's view) for the cached head features and AdaBN.
    train = decode_images(splits.train, train_geometry(prep), prep, workers=cfg.workers, desc="decode train",
                          memmap_dir=cache)
    val = decode_images(splits.val, prep, workers=cfg.workers, desc="decode val", memmap_dir=cache)
    test = decode_images(splits.test, prep, workers=cfg.workers, desc="decode test", memmap_dir=cache)
    require_every_class(train, splits.classes, "train")
    if len(val) == 0:
        raise ConfigError("the validation split is empty", hint="add images, or raise --val-split")
    skipped = train.skipped + val.skipped + test.skipped
    if skipped and dist.main:
        total = len(splits.train) + len(splits.val) + len(splits.test)
        log.warning("%s (listed in %s)", summarize_skipped(skipped, total), out / "skipped.txt")
        runfolder.write_skipped(out / "skipped.txt", skipped)
    return train, val, test


def unwrap(model: nn.Module) -> Net:
    """The :class:`Net` inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def end_epoch(run: Run, opt: torch.optim.Optimizer, phase: str, stats: EpochStats, val_loss: float, val_acc: float,
              lr: float) -> None:
    """Record the epoch, write last.pt (and best.pt when validation improved), log one line."""
    state = run.state
    state.epoch += 1
    improved = state.improves(val_acc, val_loss, one_image=1 / max(len(run.val), 1))
    if improved:
        state.best_acc, state.best_epoch, state.best_loss = val_acc, state.epoch, val_loss
        state.top_acc = max(state.top_acc, val_acc)
    state.history.append({"epoch": state.epoch, "phase": phase, "train_loss": stats.loss, "train_acc": stats.acc,
                          "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "images": stats.images,
                          "images_per_s": stats.images_per_s, "seconds": stats.seconds})
    augment_states = _gather_gen_states(run.dist, run.aug_gen)
    if run.dist.main:
        payload = model_payload(run, metrics={"val_accuracy": val_acc, "val_loss": val_loss})
        if improved:  # the weights validated: the averaged ones when --ema is on
            save_checkpoint(run.out / "best.pt", {**payload, "state_dict": _weights(run.ema.model if run.ema
                                                                                     else unwrap(run.model))})
        save_checkpoint(run.out / "last.pt", {
            **payload, "optimizer": opt.state_dict(), "state": {**asdict(state), "phase": phase},
            "rng": {"shuffle": run.shuffle_gen.get_state(), "augment": augment_states, "torch": torch.get_rng_state()},
            **({"ema": run.ema.state_dict()} if run.ema else {}),
        })
        log.info("epoch %d/%d [%s] train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%%%s | %.1f img/s, %.1fs",
                 state.epoch, run.cfg.epochs, phase, stats.loss, 100 * stats.acc, val_loss, 100 * val_acc,
                 " *best*" if improved else "", stats.images_per_s, stats.seconds)
    dist_utils.barrier(run.dist)


def model_payload(run: Run, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint needs to rebuild and describe its model on its own (tensors and plain data only)."""
    return {"arch": run.cfg.arch, "labels": run.splits.classes, "preprocess": run.prep.to_dict(),
            "state_dict": _weights(unwrap(run.model)),
            "config": run.cfg.to_dict(), "tledge_version": __version__, "epoch": run.state.epoch, "metrics": metrics,
            **run.state.orientations()}  # whether training mirrored/flipped/rotated images (auto: per dataset)


def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def _gather_gen_states(dist: dist_utils.Dist, gen: torch.Generator) -> list[torch.Tensor]:
    if not dist.enabled:
        return [gen.get_state()]
    import torch.distributed as tdist

    states: list[Any] = [None] * dist.world
    tdist.all_gather_object(states, gen.get_state())
    return states
