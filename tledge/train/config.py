"""Every knob of a fine-tuning run, torch-free: the CLI takes its defaults from here, the Python API is
:class:`FinetuneConfig` itself, and every checkpoint and metrics.json stores it."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Optional

from tledge.arch_names import ARCH_NAMES, DEFAULT_ARCH
from tledge.errors import ConfigError
from tledge.train.speed.choice import COMPILE_MODES, PRECISIONS


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Each field's comment says what it changes."""

    data: str  # DATA/<class>/* or DATA/{train,val,test}/<class>/*
    arch: str = DEFAULT_ARCH  # see tledge.models.ARCHS
    weights: str = "imagenet"  # imagenet | none (from scratch) | path to a state dict
    # Total epochs, head warm-up included. 16 (was 12): the fine-tuning steps are 1.3-1.6x cheaper on a CPU since
    # issue 23, and validation accuracy was still rising at the end of 10-12 epochs on ELPV and digits (RESULTS §12).
    epochs: int = 16
    freeze_epochs: int = 3  # head-only epochs on cached features; >= epochs: the backbone is never unfrozen
    img_size: Optional[int] = None  # model input, pixels (square); None: the arch's ImageNet size (Lite2: 260),
    # or the training images' own when smaller (>= 64 px; tledge.data.input_size)
    crop_ratio: float = 1.0  # eval: shorter side to img_size / crop_ratio, then centre crop
    batch_size: int = 32  # global batch (split across torchrun processes)
    lr: float = 1e-3  # head learning rate (AdamW); the backbone gets lr * backbone_lr_scale
    # 0.5 (was 0.1): ELPV and digits are far from ImageNet; at 0.1 the backbone barely moved in 13 epochs
    # (digits: 99.33% test at 0.5 against 98.44% at 0.1, RESULTS §12)
    backbone_lr_scale: float = 0.5
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    weight_decay: Optional[float] = None  # None: 0.05 for AdamW, 1e-4 for SGD; never on biases / norms
    warmup_epochs: float = 1.0  # linear LR warm-up at the start of fine-tuning
    label_smoothing: float = 0.1
    dropout: float = 0.2  # before the head
    patience: int = 5  # early stopping: fine-tuning epochs without a better val accuracy (0: off)
    val_split: float = 0.1  # fraction carved out for validation when the folder has no val/
    test_split: float = 0.2  # fraction held out for testing when the folder has no train/ layout
    # Mirror images left-right in training (and add mirrored features to the head warm-up). None (auto): on
    # when the class survives it: a head trained on mirrored training images alone classifies the validation
    # split as well as one trained on them as they are (within one image) (seconds, cached features). Off when
    # orientation carries the class: digits, text, arrows, left/right parts.
    hflip: Optional[bool] = None
    # Also flip vertically / rotate by multiples of 90 degrees (top-down, microscopy, inspection images; wrong for
    # digits and photos with an up). None (auto): decided like hflip (tledge.train.phases.decide_orientations).
    vflip: Optional[bool] = None
    rot90: Optional[bool] = None
    # Random-resized-crop keeps at least this fraction of the image area. 0.8 (was ImageNet's 0.35): a user's
    # images are framed on the subject, and a tight crop can cut away a defect or half a digit (RESULTS §12);
    # lower it for photos where the object is small and anywhere.
    crop_scale: float = 0.8
    unfreeze: Optional[int] = None  # fine-tune only the last N backbone stages (None: all of them)
    # Keep an exponential moving average of the weights while fine-tuning, with this decay (None: off);
    # validation, best.pt and every export use the averaged weights.
    ema: Optional[float] = None
    # BatchNorm in inference mode while fine-tuning (Keras' advice too): the head was fitted on
    # features computed with the running statistics; batch statistics of a small, domain-shifted
    # batch would change the features under it. Also ~15% faster on CPU.
    train_bn: bool = False
    # Re-estimate BatchNorm statistics on the training images first (AdaBN): for data far from
    # ImageNet (grayscale EL, X-ray, microscopy) at a few hundred images or more. Off by default:
    # on tiny datasets the estimates are noisy.
    adapt_bn: bool = False
    # A binary task's decision threshold, chosen on the validation split after training and carried by every
    # export: "CLASS:recall=0.95" (catch 95% of CLASS, as precisely as possible) or "CLASS:precision=0.9".
    # None: the most probable class.
    operating_point: Optional[str] = None
    # Prediction sets: the share of held-out true classes they must hold (split conformal, on the val split).
    coverage: float = 0.95
    # "unknown": the share of held-out in-distribution images kept below the out-of-distribution threshold.
    ood_keep: float = 0.95
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    # How the fine-tuning phase computes on a CPU; a probe at run start decides each "auto" for this machine
    # (cached in $TLEDGE_CACHE/train/choices.json), prints it in one line and saves it in metrics.json.
    # Validation, best.pt, export and verification are fp32 whatever is chosen here.
    precision: str = "auto"  # auto | fp32 | bf16 (CPU autocast, fp32 master weights); auto: bf16 only in hardware
    compile: str = "auto"  # auto | on | off: torch.compile the training step; auto: where measured here to pay
    threads: Optional[int] = None  # torch threads while training on a CPU; None: one per physical core
    # Exact-math speed-ups of each step: frozen BatchNorm folded into its convolution, the fused optimizer
    # step, freed activation memory reused instead of unmapped. Off: the plain loop, the reference they are
    # measured and checked against.
    speedups: bool = True
    out: Optional[str] = None  # run folder; default runs/exp, runs/exp2, ...
    seed: int = 0
    workers: int = 4  # image decoding threads

    def validate(self) -> None:
        if self.arch not in ARCH_NAMES:
            raise ConfigError(f"unknown architecture {self.arch!r}", hint=f"choose one of: {', '.join(ARCH_NAMES)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", hint="use adamw or sgd")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", hint=f"use one of: {', '.join(PRECISIONS)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"unknown compile mode {self.compile!r}", hint=f"use one of: {', '.join(COMPILE_MODES)}")
        checks = [(self.epochs >= 1, "--epochs must be at least 1"),
                  (self.freeze_epochs >= 0, "--freeze-epochs must be >= 0"),
                  (self.img_size is None or 16 <= self.img_size <= 1024, "--img-size must be in 16..1024"),
                  (self.batch_size >= 1, "--batch-size must be at least 1"), (self.lr > 0, "--lr must be positive"),
                  (0 < self.crop_ratio <= 1, "--crop-ratio must be in (0, 1]"),
                  (0.05 <= self.crop_scale <= 1, "--crop-scale must be in [0.05, 1]"),
                  (self.unfreeze is None or self.unfreeze >= 1, "--unfreeze must be at least 1"),
                  (self.ema is None or 0 < self.ema < 1, "--ema must be in (0, 1)"),
                  (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
                  (0 < self.coverage < 1, "--coverage must be in (0, 1), e.g. 0.95"),
                  (0 < self.ood_keep < 1, "--ood-keep must be in (0, 1), e.g. 0.95"),
                  (self.threads is None or 1 <= self.threads <= 1024, "--threads must be in 1..1024")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message, hint="see `tledge finetune --help`")
        if self.operating_point is not None:
            from tledge.answers.operating_point import parse_spec

            parse_spec(self.operating_point)

    @property
    def head_epochs(self) -> int:
        return min(self.freeze_epochs, self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """From a checkpoint's config; fields a newer or older tledge wrote are ignored or defaulted."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default(name: str) -> Any:
    """The default of one :class:`FinetuneConfig` field: what a CLI option shows and uses."""
    field = next(f for f in fields(FinetuneConfig) if f.name == name)
    if field.default is MISSING:
        raise KeyError(f"{name} has no default")
    return field.default


@dataclass(frozen=True)
class CalibrationSource:
    """Where `tledge export` takes int8 calibration images from, and how many."""

    folder: Optional[str] = None  # any image folder; default: the run's train split
    size: int = 300  # ORT's and TensorRT's guidance: a few hundred representative images
    seed: int = 0  # which ones
