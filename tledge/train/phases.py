"""The two training phases of a run, and what they need: AdaBN, cached head features, validation, optimizers.

1. :func:`head_phase`: the pretrained backbone is frozen, so its features are computed once (the image
   as the device sees it, and its mirrored, flipped and rotated views that are on or to be decided) and the
   linear head trains on them in milliseconds.
   A good head first keeps the random head's large gradients from wrecking the pretrained features
   when they unfreeze.
2. :func:`finetune_phase`: the backbone (or its last ``--unfreeze`` stages) trains too, with
   augmentation, the backbone at ``lr * backbone_lr_scale``, cosine schedule with linear warm-up,
   label smoothing, channels-last memory, AMP on CUDA, early stopping on validation accuracy.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from tledge.models import Net, train_mode, trainable_stages
from tledge.train import distributed as dist_utils
from tledge.train.ema import WeightEMA
from tledge.train.loops import adapt_batchnorm, evaluate_logits, infer, train_epoch, train_head_epoch, warmup_cosine
from tledge.train.run import Run, end_epoch, unwrap
from tledge.train.speed.apply import keep_allocations, release_allocations, set_threads
from tledge.train.speed.step import TrainStep
from tledge.train.transforms import BatchAugment

log = logging.getLogger(__name__)

ADAPT_BN_IMAGES = 1024  # BatchNorm statistics settle well before this many images
TRIAL_EPOCHS = 3  # head epochs per trial of an orientation's "auto"
# The orientation changes training can use: what the log calls the changed images, and the change on an NHWC
# uint8 batch.
ORIENTATIONS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "hflip": ("mirrored", lambda b: b.flip(2)),
    "vflip": ("vertically flipped", lambda b: b.flip(1)),
    "rot90": ("rotated", lambda b: b.rot90(1, dims=(1, 2))),  # training inputs are square
}


def adapt_bn(run: Run) -> None:
    """Re-estimate every BatchNorm's statistics on the training images (AdaBN) before anything trains.

    ImageNet's statistics describe ImageNet; on grayscale electroluminescence, X-ray or
    microscopy images the activations have other means and variances. One forward pass in
    statistics mode fixes that, and because fine-tuning then keeps BatchNorm in inference
    mode, the head warm-up and the fine-tuning see the same features.
    """
    dist, net = run.dist, unwrap(run.model)
    rows = np.arange(dist.rank, len(run.train), dist.world)[: max(1, ADAPT_BN_IMAGES // dist.world)]
    n = adapt_batchnorm(net.backbone, run.train.views[1], run.normalize, rows=rows, batch_size=run.cfg.batch_size,
                        device=dist.device)
    if dist.enabled:  # average the per-process estimates
        for m in net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(dist_utils.all_sum(dist, m.running_mean.clone()) / dist.world)
                m.running_var.copy_(dist_utils.all_sum(dist, m.running_var.clone()) / dist.world)
    log.info("BatchNorm statistics re-estimated on %d training images (%d layers)", len(rows) * dist.world, n)


def head_phase(run: Run) -> None:
    """Frozen backbone: features of every training image (and its orientation changes) once, then the head alone."""
    cfg, net = run.cfg, unwrap(run.model)
    net.backbone.requires_grad_(False)
    views = train_features(run)
    labels = torch.from_numpy(run.train.labels)
    val_feats = sharded_infer(run, net.backbone, run.val.images, "val features")
    decide_orientations(run, views, labels, val_feats, torch.from_numpy(run.val.labels))
    chosen = [views["plain"], *(views[name] for name in ORIENTATIONS if getattr(run.state, name))]
    feats, labels = torch.cat(chosen), labels.repeat(len(chosen))
    opt = make_optimizer(cfg, [{"params": list(net.head.parameters()), "lr": cfg.lr}])
    saved = run.optimizer_state("head")
    if saved is not None:
        opt.load_state_dict(saved)
    while run.state.epoch < cfg.head_epochs:
        stats = train_head_epoch(net.head, net.dropout, feats, labels, opt, run.shuffle_gen,
                                 batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            net.head.eval()
            val_loss, val_acc = evaluate_logits(net.head(val_feats), torch.from_numpy(run.val.labels))
        end_epoch(run, opt, "head", stats, val_loss, val_acc, lr=cfg.lr)


def decide_orientations(run: Run, views: dict[str, torch.Tensor], labels: torch.Tensor, val_feats: torch.Tensor,
                        val_labels: torch.Tensor) -> None:
    """Each orientation change left on "auto" (``--hflip``, ``--vflip``, ``--rot90``) is used only if it keeps the
    class: a head trained on the changed training images alone classifies the validation images (as they are)
    as well as a head trained on the images as they are (within one image). A mirrored digit, an upside-down
    "top" or a quarter-turned stripe is another class, and its head fails; a mirrored or flipped solar cell is
    the same cell. Head trainings on cached features: seconds, no convolution. A resumed run keeps what it
    decided."""
    state, cfg = run.state, run.cfg
    auto = [name for name in ORIENTATIONS if getattr(state, name) is None and getattr(cfg, name) is None]
    with torch.random.fork_rng(devices=[]):  # dropout draws from torch's RNG: the run's own draws stay as they were
        base = _trial_head(run, views["plain"], labels, val_feats, val_labels) if auto else 0.0
        for name, (adjective, _) in ORIENTATIONS.items():
            if name in auto:
                changed = _trial_head(run, views[name], labels, val_feats, val_labels)
                setattr(state, name, keeps_class(name, adjective, base, changed, len(val_labels)))
            elif getattr(state, name) is None:
                setattr(state, name, getattr(cfg, name))


def keeps_class(name: str, adjective: str, base: float, changed: float, n: int) -> bool:
    """On when the head trained on changed images does as well as the plain one, within one validation image.

    Not within a standard error: an ImageNet backbone's pooled features barely change when a digit is mirrored,
    so a head trained on mirrored digits alone still scored 89.7% against 91.9% (digits split 1, 136 images;
    2 SE is 4.7 points) and mirroring, on, cost the fine-tuned model 2 points. Leaving a harmless change off
    costs less than turning a harmful one on."""
    tolerance = 1 / max(n, 1)
    chosen = changed >= base - tolerance
    log.info("%s auto: %s (a head trained on %s training images: %.2f%% on the validation images; trained on them "
             "as they are: %.2f%%)", name, "on" if chosen else "off", adjective, 100 * changed, 100 * base)
    return chosen


def _trial_head(run: Run, feats: torch.Tensor, labels: torch.Tensor, val_feats: torch.Tensor,
                val_labels: torch.Tensor) -> float:
    """Validation accuracy of a fresh copy of the head trained on these features of the training images."""
    cfg, net = run.cfg, unwrap(run.model)
    head = copy.deepcopy(net.head)
    gen = torch.Generator().manual_seed(cfg.seed + 17)  # its own stream: the run's RNGs stay untouched
    opt = make_optimizer(cfg, [{"params": list(head.parameters()), "lr": cfg.lr}])
    for _ in range(max(cfg.head_epochs, TRIAL_EPOCHS)):
        train_head_epoch(head, net.dropout, feats, labels, opt, gen, batch_size=cfg.batch_size,
                         label_smoothing=cfg.label_smoothing)
    with torch.no_grad():
        head.eval()
        return evaluate_logits(head(val_feats), val_labels)[1]


def finetune_phase(run: Run) -> None:
    """The backbone too, with augmentation, lower backbone LR, warm-up + cosine schedule, early stopping."""
    cfg, dist, net, speed = run.cfg, run.dist, unwrap(run.model), run.speed
    trainable = set_trainable(net, cfg.arch, cfg.unfreeze)
    opt = make_optimizer(cfg, param_groups(net, cfg), fused=speed.speedups)
    saved = run.optimizer_state("finetune")
    if saved is not None:
        opt.load_state_dict(saved)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[dist.device] if dist.device.type == "cuda" else None) \
        if dist.enabled else net
    steps_per_epoch = -(-(len(run.train) // dist.world) // max(1, cfg.batch_size // dist.world))
    set_lr = _schedule(opt, steps_per_epoch * (cfg.epochs - cfg.head_epochs), round(cfg.warmup_epochs * steps_per_epoch))
    augment = BatchAugment((run.prep.height, run.prep.width), scale=(cfg.crop_scale, 1.0), **orientation_flags(run))
    total = sum(p.numel() for p in net.backbone.parameters())
    log.info("fine-tuning %.2fM of %.2fM backbone parameters%s", trainable / 1e6, total / 1e6,
             f" (last {cfg.unfreeze} stages)" if cfg.unfreeze else "")
    if cfg.ema is not None:
        run.ema = WeightEMA(net, cfg.ema)
        if run.resumed is not None and "ema" in run.resumed and run.resumed["state"].get("phase") == "finetune":
            run.ema.load_state_dict(run.resumed["ema"])
    train_mode(net, cfg.train_bn)  # what the epoch loop sets too: the step runner reads it to know if BN can fold
    step = TrainStep(ddp, net, speed, label_smoothing=cfg.label_smoothing, scaler=_grad_scaler(cfg, dist.device),
                     example=run.normalize(torch.from_numpy(np.ascontiguousarray(run.train.views[1][:2]))),
                     measure_compile=speed.compile and cfg.compile == "on")
    kept = speed.speedups and dist.device.type == "cpu" and keep_allocations()
    threads = torch.get_num_threads()
    set_threads(speed.threads)
    try:
        while run.state.epoch < cfg.epochs and not run.state.stopped_early(cfg):
            with step.active():
                stats = train_epoch(run, ddp, opt, set_lr, augment, step)
            run.state.step += steps_per_epoch
            validated = run.ema.model if run.ema is not None else net
            val_loss, val_acc = evaluate_logits(sharded_infer(run, validated, run.val.images, "validate"),
                                                torch.from_numpy(run.val.labels))
            end_epoch(run, opt, "finetune", stats, val_loss, val_acc, lr=opt.param_groups[-1]["lr"])
    finally:
        set_threads(threads)
        if kept:
            release_allocations()


def _grad_scaler(cfg: Any, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 autocast on a CUDA GPU without bf16 needs loss scaling; bf16 (GPU or CPU) and fp32 do not."""
    if cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def _schedule(opt: torch.optim.Optimizer, total_steps: int, warmup: int) -> Callable[[int], None]:
    """``set_lr(step)``: every group at its base LR times the warm-up + cosine factor of ``step``."""
    def set_lr(step: int) -> None:
        factor = warmup_cosine(step, total_steps, warmup)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor

    return set_lr


def set_trainable(net: Net, arch: str, unfreeze: Optional[int]) -> int:
    """Unfreeze the last ``unfreeze`` backbone stages (None: all); returns how many backbone parameters train."""
    net.backbone.requires_grad_(unfreeze is None)
    if unfreeze is not None:
        for module in trainable_stages(net, arch, unfreeze):
            module.requires_grad_(True)
    return sum(p.numel() for p in net.backbone.parameters() if p.requires_grad)


def orientation_flags(run: Run) -> dict[str, bool]:
    """What fine-tuning augments with: what the head phase decided; without a head phase (``--freeze-epochs 0``),
    mirrors unless ``--no-hflip`` (ImageNet's habit) and flips or rotations only when asked for."""
    state, cfg = run.state, run.cfg
    return {"hflip": state.hflip if state.hflip is not None else cfg.hflip is not False,
            "vflip": state.vflip if state.vflip is not None else cfg.vflip is True,
            "rot90": state.rot90 if state.rot90 is not None else cfg.rot90 is True}


def train_features(run: Run) -> dict[str, torch.Tensor]:
    """Backbone features of each training image as the device sees it ("plain"), and of each orientation change
    that is on or still to be decided."""
    net, eval_view = unwrap(run.model), run.train.views[1]
    views = {"plain": sharded_infer(run, net.backbone, eval_view, "train features")}
    for name, (adjective, view) in ORIENTATIONS.items():
        decided = getattr(run.state, name)
        if decided or (decided is None and getattr(run.cfg, name) is not False):
            views[name] = sharded_infer(run, net.backbone, eval_view, f"{adjective} features", view=view)
    return views


def sharded_infer(run: Run, module: nn.Module, images: np.ndarray, desc: str,
                  view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``module`` over ``images``, each process taking every ``world``-th row, gathered back in order."""
    dist = run.dist
    rows = np.arange(dist.rank, len(images), dist.world)
    out = infer(module, images, run.normalize, batch_size=run.cfg.batch_size, device=dist.device, amp=run.cfg.amp,
                desc=desc, rows=rows, view=view)
    return dist_utils.gather_rows(dist, out, len(images))


def param_groups(net: Net, cfg: Any) -> list[dict[str, Any]]:
    """Backbone at a lower LR than the head; no weight decay on biases and norm scales; frozen parameters left out."""
    wd = cfg.weight_decay if cfg.weight_decay is not None else (0.05 if cfg.optimizer == "adamw" else 1e-4)
    groups = []
    for module, lr in ((net.backbone, cfg.lr * cfg.backbone_lr_scale), (net.head, cfg.lr)):
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg: Any, groups: list[dict[str, Any]], fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``. ``fused``: one kernel updates every parameter (the same arithmetic; PyTorch's
    default on a CPU loops over ~200 tensors with ~10 small ops each: 12% of a Lite0 step on machine C)."""
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
