"""The two training phases of a run, and what they need: AdaBN, cached head features, validation, optimizers.

1. :func:`head_phase`: the pretrained backbone is frozen, so its features are computed once (the image
   as the device sees it, and its mirror image) and the linear head trains on them in milliseconds.
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
HFLIP_TRIAL_EPOCHS = 3  # head epochs per trial of --hflip auto


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
    """Frozen backbone: features of every training image (and its mirror) once, then the head alone."""
    cfg, net = run.cfg, unwrap(run.model)
    net.backbone.requires_grad_(False)
    plain, mirrored = train_features(run)
    labels = torch.from_numpy(run.train.labels)
    val_feats = sharded_infer(run, net.backbone, run.val.images, "val features")
    val_labels = torch.from_numpy(run.val.labels)
    if run.state.hflip is None:
        run.state.hflip = cfg.hflip if cfg.hflip is not None else decide_hflip(run, plain, mirrored, labels,
                                                                               val_feats, val_labels)
    feats = torch.cat([plain, mirrored]) if run.state.hflip else plain
    labels = torch.cat([labels, labels]) if run.state.hflip else labels
    opt = make_optimizer(cfg, [{"params": list(net.head.parameters()), "lr": cfg.lr}])
    saved = run.optimizer_state("head")
    if saved is not None:
        opt.load_state_dict(saved)
    while run.state.epoch < cfg.head_epochs:
        stats = train_head_epoch(net.head, net.dropout, feats, labels, opt, run.shuffle_gen,
                                 batch_size=cfg.batch_size, label_smoothing=cfg.label_smoothing)
        with torch.no_grad():
            net.head.eval()
            val_loss, val_acc = evaluate_logits(net.head(val_feats), val_labels)
        end_epoch(run, opt, "head", stats, val_loss, val_acc, lr=cfg.lr)


def decide_hflip(run: Run, plain: torch.Tensor, mirrored: torch.Tensor, labels: torch.Tensor,
                 val_feats: torch.Tensor, val_labels: torch.Tensor) -> bool:
    """``--hflip auto``: mirror training images only if a head trained with mirrored images does as well on the
    validation images as one trained without. Digits, text and left/right parts lose to their mirror images;
    photos of things do not. Two head trainings on cached features: a second or two, no convolution."""
    scores = {}
    with torch.random.fork_rng(devices=[]):  # dropout draws from torch's RNG: the run's own draws stay as they were
        for mirror in (False, True):
            scores[mirror] = _trial_head(run, plain, mirrored, labels, val_feats, val_labels, mirror)
    chosen = scores[True] >= scores[False]
    log.info("hflip auto: %s (validation accuracy of the head %.2f%% with mirrored training images, %.2f%% without)",
             "on" if chosen else "off", 100 * scores[True], 100 * scores[False])
    return chosen


def _trial_head(run: Run, plain: torch.Tensor, mirrored: torch.Tensor, labels: torch.Tensor, val_feats: torch.Tensor,
                val_labels: torch.Tensor, mirror: bool) -> float:
    """Validation accuracy of a fresh copy of the head trained on the features, with or without the mirrored ones."""
    cfg, net = run.cfg, unwrap(run.model)
    head = copy.deepcopy(net.head)
    gen = torch.Generator().manual_seed(cfg.seed + 17)  # its own stream: the run's RNGs stay untouched
    feats, y = (torch.cat([plain, mirrored]), torch.cat([labels, labels])) if mirror else (plain, labels)
    opt = make_optimizer(cfg, [{"params": list(head.parameters()), "lr": cfg.lr}])
    for _ in range(max(cfg.head_epochs, HFLIP_TRIAL_EPOCHS)):
        train_head_epoch(head, net.dropout, feats, y, opt, gen, batch_size=cfg.batch_size,
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
    hflip = run.state.hflip if run.state.hflip is not None else (cfg.hflip is not False)
    augment = BatchAugment((run.prep.height, run.prep.width), scale=(cfg.crop_scale, 1.0), hflip=hflip,
                           vflip=cfg.vflip)
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


def train_features(run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of each training image as the device sees it, and of its mirror image."""
    net, eval_view = unwrap(run.model), run.train.views[1]
    plain = sharded_infer(run, net.backbone, eval_view, "train features")
    mirrored = sharded_infer(run, net.backbone, eval_view, "mirrored features", view=lambda b: b.flip(2))
    return plain, mirrored


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
