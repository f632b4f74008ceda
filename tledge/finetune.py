"""``finetune(cfg) -> RunResult``: the whole fine-tuning job, the Python API behind `tledge finetune`.

Recipe (each step says why):
1. Decode every image once (:mod:`tledge.imagecache`); bad files are skipped and counted.
2. Head warm-up, ``freeze_epochs`` epochs: the pretrained backbone is frozen, so its
   features are computed once (the image and its mirror image) and the linear head
   trains on them in milliseconds. A good head first keeps the random head's large
   gradients from wrecking the pretrained features when they unfreeze.
3. Fine-tune, the remaining epochs: the whole network trains with augmentation, the
   backbone at ``lr * backbone_lr_scale``, cosine schedule with linear warm-up, label
   smoothing, channels-last memory, AMP on CUDA, early stopping on validation accuracy.
4. ``best.pt`` is the epoch with the best validation accuracy; it is evaluated once on
   the test split at the end. ``last.pt`` after every epoch makes ``--resume`` lose nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tledge_runtime.fileio import atomic_write
from tledge_runtime.meta import Preprocess
from tledge_runtime.text import printable

from . import __version__
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Splits, load_splits
from .errors import CheckpointError, ConfigError
from .imagecache import DecodedImages, decode_images, require_every_class, summarize_skipped, train_geometry
from .loops import EpochStats, adapt_batchnorm, evaluate_logits, infer, train_epoch, train_head_epoch, warmup_cosine
from .metrics import confusion_matrix, report
from .models import Net, create_model, default_preprocess, get_arch
from .transforms import BatchAugment, Normalize

log = logging.getLogger(__name__)

ADAPT_BN_IMAGES = 1024  # BatchNorm statistics settle well before this many images
# Written first into every run folder: tledge writes (and removes its cache) only in a folder that holds it.
RUN_MARKER = ".tledge-run"


@dataclass(frozen=True)
class FinetuneConfig:
    """Every knob of a fine-tuning run. Saved inside each checkpoint and in metrics.json."""

    data: str  # DATA/<class>/* or DATA/{train,val,test}/<class>/*
    arch: str = "efficientnet_lite0"  # see tledge.models.ARCHS
    weights: str = "imagenet"  # imagenet | none (from scratch) | path to a state dict
    epochs: int = 12  # total epochs, head warm-up included
    freeze_epochs: int = 3  # head-only epochs on cached features; >= epochs: the backbone is never unfrozen
    img_size: Optional[int] = None  # model input, pixels (square); None: the arch's ImageNet size (Lite2: 260)
    crop_ratio: float = 1.0  # eval: shorter side to img_size / crop_ratio, then centre crop
    batch_size: int = 32  # global batch (split across torchrun processes)
    lr: float = 1e-3  # head learning rate (AdamW); the backbone gets lr * backbone_lr_scale
    backbone_lr_scale: float = 0.1
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    weight_decay: Optional[float] = None  # None: 0.05 for AdamW, 1e-4 for SGD; never on biases / norms
    warmup_epochs: float = 1.0  # linear LR warm-up at the start of fine-tuning
    label_smoothing: float = 0.1
    dropout: float = 0.2  # before the head
    patience: int = 5  # early stopping: fine-tuning epochs without a better val accuracy (0: off)
    val_split: float = 0.1  # fraction carved out for validation when the folder has no val/
    test_split: float = 0.2  # fraction held out for testing when the folder has no train/ layout
    vflip: bool = False  # also flip vertically (top-down, microscopy, inspection images)
    crop_scale: float = 0.35  # random-resized-crop keeps at least this fraction of the image area;
    # raise it (0.8) when the evidence is small and anywhere in the image (defects): a tight crop can miss it
    # BatchNorm in inference mode while fine-tuning (Keras' advice too): the head was fitted on
    # features computed with the running statistics; batch statistics of a small, domain-shifted
    # batch would change the features under it. Also ~15% faster on CPU.
    train_bn: bool = False
    # Re-estimate BatchNorm statistics on the training images first (AdaBN): for data far from
    # ImageNet (grayscale EL, X-ray, microscopy) at a few hundred images or more. Off by default:
    # on tiny datasets the estimates are noisy.
    adapt_bn: bool = False
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    out: Optional[str] = None  # run folder; default runs/exp, runs/exp2, ...
    seed: int = 0
    workers: int = 4  # image decoding threads

    def validate(self) -> None:
        get_arch(self.arch)
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", hint="use adamw or sgd")
        checks = [(self.epochs >= 1, "--epochs must be at least 1"), (self.freeze_epochs >= 0, "--freeze-epochs must be >= 0"),
                  (self.img_size is None or 16 <= self.img_size <= 1024, "--img-size must be in 16..1024"),
                  (self.batch_size >= 1, "--batch-size must be at least 1"), (self.lr > 0, "--lr must be positive"),
                  (0 < self.crop_ratio <= 1, "--crop-ratio must be in (0, 1]"),
                  (0.05 <= self.crop_scale <= 1, "--crop-scale must be in [0.05, 1]"),
                  (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message, hint="see `tledge finetune --help`")

    @property
    def head_epochs(self) -> int:
        return min(self.freeze_epochs, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunResult:
    out: Path
    best: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _State:
    """What resuming needs beyond the weights."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed in fine-tuning (drives the LR schedule)
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Run the whole job described by ``cfg``; returns where everything went and the final metrics."""
    cfg.validate()
    if cfg.out and (Path(cfg.out) / "last.pt").exists():
        raise ConfigError(f"{cfg.out} already holds a run", hint="add --resume to continue it, or choose another --out")
    if cfg.out:
        _check_owned(Path(cfg.out))
    d = dist_utils.setup(cfg.device)
    try:
        return _finetune(cfg, d)
    finally:
        dist_utils.teardown(d)


def _finetune(cfg: FinetuneConfig, d: dist_utils.Dist, *, resume_ckpt: Optional[dict] = None) -> RunResult:
    out = Path(dist_utils.broadcast_object(d, str(_run_dir(cfg.out))))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    splits = _splits_for(cfg, out, reuse=resume_ckpt is not None)  # bad data fails here, before any file is written
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / RUN_MARKER).is_file():  # first, before any other file (resumed pre-marker runs get one too)
            atomic_write(out / RUN_MARKER, json.dumps({"tledge": __version__, "data": cfg.data}).encode())
        _log_to_file(out / "train.log")
        log.info("run folder %s (tledge %s, torch %s, device %s, %d process(es))", out, __version__,
                 torch.__version__, d.device, d.world)
        log.info("classes: %s; images: %s (%s split)", ", ".join(splits.classes),
                 ", ".join(f"{k} {v}" for k, v in splits.counts().items()), splits.origin)
        atomic_write(out / "split.json", splits.to_json().encode())
    prep = default_preprocess(cfg.arch, cfg.img_size, cfg.crop_ratio)
    train, val, test = _decode_all(cfg, splits, prep, out, d)

    model = create_model(cfg.arch, len(splits.classes), cfg.weights, dropout=cfg.dropout)
    model = model.to(d.device, memory_format=torch.channels_last)
    normalize = Normalize(prep, d.device)
    state = _State()
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank + 1)
    ckpt = resume_ckpt
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        state = _State(**{k: v for k, v in ckpt["state"].items() if k != "phase"})
        shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        aug_gen.set_state(ckpt["rng"]["augment"][d.rank] if d.rank < len(ckpt["rng"]["augment"]) else aug_gen.get_state())
        torch.set_rng_state(ckpt["rng"]["torch"])
        log.info("resuming after epoch %d of %d (best val accuracy so far %.2f%%)", state.epoch, cfg.epochs,
                 100 * state.best_acc)

    if ckpt is None and cfg.adapt_bn and cfg.weights != "none" and len(train) >= 2 * d.world:
        _adapt_batchnorm(model, train, normalize, cfg, d)
    common = dict(cfg=cfg, d=d, out=out, splits=splits, prep=prep, model=model, val=val, normalize=normalize,
                  state=state, shuffle_gen=shuffle_gen, aug_gen=aug_gen)
    if state.epoch < cfg.head_epochs:
        _head_phase(train=train, ckpt=ckpt, **common)
    if state.epoch < cfg.epochs and not _stopped_early(cfg, state):
        _finetune_phase(train=train, ckpt=ckpt if (ckpt and ckpt["state"]["epoch"] >= cfg.head_epochs) else None, **common)
    dist_utils.barrier(d)
    return _finish(cfg, d, out, splits, prep, val, test, state)


def resume(out: str | Path) -> RunResult:
    """Continue the run in ``out`` from its ``last.pt``, with the config it was started with."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"{last}: nothing to resume", hint="pass the --out folder of an interrupted run")
    ckpt = load_checkpoint(last)
    if "state" not in ckpt:
        raise CheckpointError(f"{last}: has no training state to resume from", hint="resume from last.pt, not best.pt")
    cfg = replace(FinetuneConfig.from_dict(ckpt["config"]), out=str(out))
    cfg.validate()
    d = dist_utils.setup(cfg.device)
    try:
        return _finetune(cfg, d, resume_ckpt=ckpt)
    finally:
        dist_utils.teardown(d)


# --- stages ---------------------------------------------------------------------------------------

def _splits_for(cfg: FinetuneConfig, out: Path, *, reuse: bool) -> Splits:
    """The saved split of this run when resuming, else a new one (saved by the caller)."""
    saved = out / "split.json"
    if reuse and saved.is_file():  # a resumed run keeps its split, even if files were added to DATA since
        return Splits.from_json(saved.read_text())
    return load_splits(Path(cfg.data), val_split=cfg.val_split, test_split=cfg.test_split, seed=cfg.seed)


def _decode_all(cfg: FinetuneConfig, splits: Splits, prep: Preprocess, out: Path, d: dist_utils.Dist
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
    if skipped and d.main:
        total = len(splits.train) + len(splits.val) + len(splits.test)
        log.warning("%s (listed in %s)", summarize_skipped(skipped, total), out / "skipped.txt")
        # One line per file, tab-separated: a newline or tab in a file name is escaped (printable), so the
        # line count is the file count; a name that is not valid UTF-8 shows its bytes as \xNN.
        lines = "".join("\t".join(printable(v) for v in (p, kind, msg)) + "\n" for p, kind, msg in skipped)
        atomic_write(out / "skipped.txt", lines.encode("utf-8"))
    return train, val, test


def _head_phase(*, cfg, d, out, splits, prep, model, train, val, normalize, state, shuffle_gen, aug_gen, ckpt) -> None:
    """Frozen backbone: features of every training image (and its mirror) once, then the head alone."""
    net = _unwrap(model)
    net.backbone.requires_grad_(False)
    feats, labels = _train_features(net, train, normalize, cfg, d)
    val_feats = _sharded_infer(net.backbone, val.images, normalize, cfg, d, "val features")
    val_labels = torch.from_numpy(val.labels)
    head_params = list(net.head.parameters())
    opt = _optimizer(cfg, [{"params": head_params, "lr": cfg.lr}])
    if ckpt is not None and ckpt.get("optimizer") and ckpt["state"].get("phase") == "head":
        opt.load_state_dict(ckpt["optimizer"])
    while state.epoch < cfg.head_epochs:
        stats = train_head_epoch(net.head, net.dropout, feats, labels, opt, shuffle_gen,
                                 batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            net.head.eval()
            val_loss, val_acc = evaluate_logits(net.head(val_feats), val_labels)
        _end_epoch(cfg, d, out, splits, prep, model, opt, state, shuffle_gen, aug_gen, "head", stats, val_loss, val_acc,
                   lr=cfg.lr)


def _finetune_phase(*, cfg, d, out, splits, prep, model, train, val, normalize, state, shuffle_gen, aug_gen, ckpt) -> None:
    """The whole network, with augmentation, lower backbone LR, warm-up + cosine schedule, early stopping."""
    net = _unwrap(model)
    net.backbone.requires_grad_(True)
    groups = _param_groups(net, cfg)
    opt = _optimizer(cfg, groups)
    if ckpt is not None and ckpt.get("optimizer") and ckpt["state"].get("phase") == "finetune":
        opt.load_state_dict(ckpt["optimizer"])
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.enabled else net
    steps_per_epoch = -(-(len(train) // d.world) // max(1, cfg.batch_size // d.world))
    total_steps = steps_per_epoch * (cfg.epochs - cfg.head_epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def set_lr(step: int) -> None:
        factor = warmup_cosine(step, total_steps, warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor

    augment = BatchAugment((prep.height, prep.width), scale=(cfg.crop_scale, 1.0), vflip=cfg.vflip)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and d.device.type == "cuda"
                                               and not torch.cuda.is_bf16_supported()) else None
    while state.epoch < cfg.epochs and not _stopped_early(cfg, state):
        desc = f"epoch {state.epoch + 1}/{cfg.epochs}"
        stats = train_epoch(ddp, train.images, train.labels, augment=augment, normalize=normalize, opt=opt,
                            set_lr=set_lr, step0=state.step, shuffle_gen=shuffle_gen, aug_gen=aug_gen,
                            batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing, d=d, amp=cfg.amp,
                            scaler=scaler, freeze_bn=not cfg.train_bn, desc=desc)
        state.step += steps_per_epoch
        val_loss, val_acc = _val_metrics(net, val, normalize, cfg, d)
        _end_epoch(cfg, d, out, splits, prep, model, opt, state, shuffle_gen, aug_gen, "finetune", stats, val_loss,
                   val_acc, lr=opt.param_groups[-1]["lr"])


def _finish(cfg, d, out, splits, prep, val, test, state) -> RunResult:
    """Evaluate best.pt on val and test, write metrics.json, history.csv and the plots."""
    if d.main:
        _remove_cache(out / "cache")
    best_path = out / "best.pt"
    best = load_checkpoint(best_path)
    model = create_model(cfg.arch, len(splits.classes), "none", dropout=cfg.dropout)
    model.load_state_dict(best["state_dict"])
    model = model.to(d.device, memory_format=torch.channels_last).eval()
    normalize = Normalize(prep, d.device)
    results: dict[str, Any] = {}
    for name, data in (("val", val), ("test", test)):
        if len(data) == 0:
            continue
        logits = infer(model, data.images, normalize, batch_size=cfg.batch_size, device=d.device, amp=cfg.amp,
                       desc=f"evaluate {name}")
        cm = confusion_matrix(data.labels, logits.argmax(1).numpy(), len(splits.classes))
        results[name] = report(cm, splits.classes)
    metrics = {
        "tledge_version": __version__, "arch": cfg.arch, "weights": cfg.weights, "best_epoch": state.best_epoch,
        "epochs_run": state.epoch, "classes": splits.classes, "images": splits.counts(),
        "skipped_images": _count_skipped(out),
        "train_seconds": round(sum(h["seconds"] for h in state.history), 1),
        **{f"{k}_accuracy": v["accuracy"] for k, v in results.items()}, "reports": results, "config": cfg.to_dict(),
    }
    if d.main:
        from .plots import plot_confusion, plot_curves

        atomic_write(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        _write_history(out / "history.csv", state.history)
        plot_curves(state.history, out / "curves.png", title=f"{cfg.arch} on {Path(cfg.data).name}")
        final = "test" if "test" in results else "val"
        plot_confusion(results[final]["confusion"], splits.classes, out / "confusion.png",
                       title=f"{final} split, accuracy {100 * results[final]['accuracy']:.2f}%")
        # Fold the final numbers into best.pt so `export` and `evaluate` see them without metrics.json.
        best["metrics"] = {**best.get("metrics", {}), **{f"{k}_accuracy": v["accuracy"] for k, v in results.items()}}
        save_checkpoint(best_path, {k: v for k, v in best.items() if k not in ("format", "format_version")})
    return RunResult(out=out, best=best_path, metrics=metrics, history=state.history)


# --- helpers --------------------------------------------------------------------------------------

def _train_features(net: Net, train: DecodedImages, normalize: Normalize, cfg, d) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of each training image as the device sees it, and of its mirror image."""
    eval_view = train.views[1]
    views = [_sharded_infer(net.backbone, eval_view, normalize, cfg, d, f"train features {i + 1}/2",
                            view=(lambda b: b.flip(2)) if i else None) for i in range(2)]
    labels = torch.from_numpy(train.labels)
    return torch.cat(views), torch.cat([labels, labels])


def _adapt_batchnorm(net: Net, train: DecodedImages, normalize: Normalize, cfg, d) -> None:
    """Re-estimate every BatchNorm's statistics on the training images (AdaBN) before anything trains.

    ImageNet's statistics describe ImageNet; on grayscale electroluminescence, X-ray or
    microscopy images the activations have other means and variances. One forward pass in
    statistics mode fixes that, and because fine-tuning then keeps BatchNorm in inference
    mode, the head warm-up and the fine-tuning see the same features.
    """
    rows = np.arange(d.rank, len(train), d.world)[: max(1, ADAPT_BN_IMAGES // d.world)]
    n = adapt_batchnorm(net.backbone, train.views[1], normalize, rows=rows, batch_size=cfg.batch_size,
                        device=d.device)
    if d.enabled:  # average the per-process estimates
        for m in net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(dist_utils.all_sum(d, m.running_mean.clone()) / d.world)
                m.running_var.copy_(dist_utils.all_sum(d, m.running_var.clone()) / d.world)
    log.info("BatchNorm statistics re-estimated on %d training images (%d layers)", len(rows) * d.world, n)


def _sharded_infer(module, images, normalize, cfg, d, desc, view=None) -> torch.Tensor:
    rows = np.arange(d.rank, len(images), d.world)
    out = infer(module, images, normalize, batch_size=cfg.batch_size, device=d.device, amp=cfg.amp, desc=desc,
                rows=rows, view=view)
    return dist_utils.gather_rows(d, out, len(images))


def _val_metrics(net: Net, val: DecodedImages, normalize: Normalize, cfg, d) -> tuple[float, float]:
    logits = _sharded_infer(net, val.images, normalize, cfg, d, "validate")
    return evaluate_logits(logits, torch.from_numpy(val.labels))


def _end_epoch(cfg, d, out, splits, prep, model, opt, state: _State, shuffle_gen, aug_gen, phase: str,
               stats: EpochStats, val_loss: float, val_acc: float, *, lr: float) -> None:
    """Record the epoch, write last.pt (and best.pt when val accuracy improved), log one line."""
    state.epoch += 1
    improved = val_acc > state.best_acc
    if improved:
        state.best_acc, state.best_epoch = val_acc, state.epoch
    state.history.append({"epoch": state.epoch, "phase": phase, "train_loss": stats.loss, "train_acc": stats.acc,
                          "val_loss": val_loss, "val_acc": val_acc, "lr": lr, "images": stats.images, "images_per_s": stats.images_per_s,
                          "seconds": stats.seconds})
    augment_states = _gather_gen_states(d, aug_gen)
    if d.main:
        net = _unwrap(model)
        payload = {
            "arch": cfg.arch, "labels": splits.classes, "preprocess": prep.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "config": cfg.to_dict(), "tledge_version": __version__, "epoch": state.epoch,
            "metrics": {"val_accuracy": val_acc, "val_loss": val_loss},
        }
        if improved:
            save_checkpoint(out / "best.pt", payload)
        save_checkpoint(out / "last.pt", {
            **payload, "optimizer": opt.state_dict(),
            "state": {**{k: v for k, v in asdict(state).items()}, "phase": phase},
            "rng": {"shuffle": shuffle_gen.get_state(), "augment": augment_states, "torch": torch.get_rng_state()},
        })
        log.info("epoch %d/%d [%s] train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%%%s | %.1f img/s, %.1fs",
                 state.epoch, cfg.epochs, phase, stats.loss, 100 * stats.acc, val_loss, 100 * val_acc,
                 " *best*" if improved else "", stats.images_per_s, stats.seconds)
    dist_utils.barrier(d)


def _gather_gen_states(d, gen: torch.Generator) -> list[torch.Tensor]:
    if not d.enabled:
        return [gen.get_state()]
    import torch.distributed as dist

    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, gen.get_state())
    return states


def _stopped_early(cfg: FinetuneConfig, state: _State) -> bool:
    if cfg.patience <= 0 or state.epoch <= cfg.head_epochs:
        return False
    return state.epoch - max(state.best_epoch, cfg.head_epochs) >= cfg.patience


def _param_groups(net: Net, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Backbone at a lower LR than the head; no weight decay on biases and norm scales."""
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.05 if cfg.optimizer == "adamw" else 1e-4)
    groups = []
    for module, lr in ((net.backbone, cfg.lr * cfg.backbone_lr_scale), (net.head, cfg.lr)):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(cfg: FinetuneConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _unwrap(model: nn.Module) -> Net:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _run_dir(out: Optional[str]) -> Path:
    return Path(out) if out else next_free_run_dir("exp")


def next_free_run_dir(name: str, base: Path = Path("runs")) -> Path:
    """``runs/<name>``, or ``runs/<name>2``, ``runs/<name>3``... whichever does not exist yet."""
    for i in range(1, 10_000):
        candidate = base / (name if i == 1 else f"{name}{i}")
        if not candidate.exists():
            return candidate
    raise ConfigError(f"{base} holds 10,000 runs named {name}*", hint="pass --out")


def _check_owned(out: Path) -> None:
    """Refuse, before touching it, an existing non-empty ``--out`` that is not a tledge run folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a folder", hint="choose another --out")
    if out.is_dir() and not (out / RUN_MARKER).is_file() and any(out.iterdir()):
        raise ConfigError(f"{out}: folder is not empty and is not a tledge run (no {RUN_MARKER}); "
                          "tledge writes only into folders it created",
                          hint="choose a new or empty --out folder")


def _remove_cache(cache: Path) -> None:
    """Remove the memory-mapped image caches of large datasets: the ``*.u8.npy`` files imagecache wrote,
    then the folder if nothing else is in it. Never through a symbolic link, never another file."""
    if cache.is_symlink() or not cache.is_dir():
        return
    for f in cache.glob("*.u8.npy"):
        if f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)
    try:
        cache.rmdir()
    except OSError:  # not empty: someone else's files, left alone
        pass


def _count_skipped(out: Path) -> int:
    path = out / "skipped.txt"
    if not path.is_file():
        return 0
    return sum(1 for _ in path.open())


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    atomic_write(path, buf.getvalue().encode())


def _log_to_file(path: Path) -> None:
    """Also keep the run's log lines next to its checkpoints."""
    root = logging.getLogger("tledge")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
