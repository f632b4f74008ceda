"""The inner loops: inference over decoded images, head training on cached features, one
fine-tuning epoch. Plain functions over tensors; the orchestration is in :mod:`tledge.train.finetune`."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tledge.models import train_mode
from tledge.progress import progress
from tledge.train.distributed import all_sum
from tledge.train.run import EpochStats, Run
from tledge.train.transforms import BatchAugment, Normalize


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA (bf16 where the GPU has it, else fp16); full fp32 on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.inference_mode()
def infer(module: nn.Module, images: np.ndarray, normalize: Normalize, *, batch_size: int, device: torch.device,
          amp: bool = True, desc: str = "infer", rows: Optional[np.ndarray] = None,
          view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Run ``module`` (eval mode) over uint8 NHWC ``images`` (optionally only ``rows``); float32 CPU outputs.

    ``view`` maps a uint8 batch to another uint8 batch first (e.g. a mirror image).
    """
    module.eval()
    idx = np.arange(len(images)) if rows is None else rows
    outs = []
    for start in progress(range(0, len(idx), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[idx[start:start + batch_size]]))
        if view is not None:
            batch = view(batch)
        x = normalize(batch.to(device, non_blocking=True))
        with autocast(device, amp):
            outs.append(module(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, images: np.ndarray, normalize: Normalize, *, rows: np.ndarray, batch_size: int,
                    device: torch.device) -> int:
    """Replace the running statistics of every BatchNorm in ``module`` by those of ``images[rows]``.

    Statistics mode with ``momentum=None`` makes PyTorch keep a plain cumulative average of the
    batch statistics; nothing else changes (no gradients, no weights). Returns the layer count.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if len(chunk) < 2 and start > 0:
            continue  # a lone last image: batch statistics of one 1x1 map are undefined, and it adds nothing
        batch = torch.from_numpy(np.ascontiguousarray(images[chunk]))
        module(normalize(batch.to(device)))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.eval()
    return len(norms)


def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[float, float]:
    """(mean loss, accuracy) of ``logits`` against ``labels``."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc


HEAD_MIN_STEPS = 50  # a head "epoch" on a small dataset repeats passes until this many steps: still milliseconds


def train_head_epoch(head: nn.Module, dropout: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                     opt: torch.optim.Optimizer, gen: torch.Generator, *, batch_size: int,
                     label_smoothing: float) -> EpochStats:
    """One epoch of the linear head on cached backbone features: milliseconds, not minutes.

    With cached features a step costs microseconds, so an epoch of a small dataset (a few
    steps) would leave the head far from trained; it repeats passes up to ``HEAD_MIN_STEPS``.
    """
    head.train()
    dropout.train()
    t0 = time.perf_counter()
    passes = max(1, math.ceil(HEAD_MIN_STEPS / math.ceil(len(feats) / batch_size)))
    perm = torch.cat([torch.randperm(len(feats), generator=gen) for _ in range(passes)])
    total_loss, correct = 0.0, 0
    for start in range(0, len(perm), batch_size):
        rows = perm[start:start + batch_size]
        logits = head(dropout(feats[rows]))
        loss = F.cross_entropy(logits, labels[rows], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(rows)
        correct += int((logits.argmax(1) == labels[rows]).sum())
    n = len(perm)
    return EpochStats(total_loss / max(n, 1), correct / max(n, 1), n, time.perf_counter() - t0)


def train_epoch(run: Run, model: nn.Module, opt: torch.optim.Optimizer, set_lr: Callable[[int], None],
                augment: BatchAugment, train_step: Callable[[torch.optim.Optimizer, torch.Tensor, torch.Tensor],
                                                            tuple[float, torch.Tensor]]) -> EpochStats:
    """One epoch of fine-tuning with augmentation over ``run``'s training images; returns global
    (all-process) loss and accuracy. ``model`` is the run's network, or its DistributedDataParallel wrapper;
    ``train_step(opt, x, y) -> (loss, logits)`` trains one batch the way the run's speed choice says
    (:class:`tledge.train.speed.step.TrainStep`)."""
    cfg, d = run.cfg, run.dist
    images, labels = run.train.images, run.train.labels
    train_mode(model, cfg.train_bn)
    # The same permutation on every process; each takes its own slice, all of equal length.
    perm = torch.randperm(len(labels), generator=run.shuffle_gen)
    per_rank = len(perm) // d.world
    mine = perm[d.rank * per_rank:(d.rank + 1) * per_rank] if d.enabled else perm
    local_bs = max(1, cfg.batch_size // d.world)
    steps = math.ceil(len(mine) / local_bs)
    labels_t = torch.from_numpy(labels)
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    t0 = time.perf_counter()
    bar = progress(total=steps, desc=f"epoch {run.state.epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
    for step in range(steps):
        rows = mine[step * local_bs:(step + 1) * local_bs]
        set_lr(run.state.step + step)
        batch = augment(torch.from_numpy(images[rows.numpy()]), run.aug_gen)
        x = run.normalize(batch.to(d.device, non_blocking=True))
        y = labels_t[rows].to(d.device, non_blocking=True)
        loss, logits = train_step(opt, x, y)
        if run.ema is not None:
            run.ema.update(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
        n = len(rows)
        sums += torch.tensor([loss * n, float((logits.argmax(1) == y).sum()), n], dtype=torch.float64)
        bar.update(1)
        seen = sums[2].item() * d.world
        bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.3f}", acc=f"{100 * sums[1].item() / sums[2].item():.1f}%",
                        img_s=f"{seen / (time.perf_counter() - t0):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    sums = all_sum(d, sums)
    n = int(sums[2].item())
    return EpochStats(sums[0].item() / max(n, 1), sums[1].item() / max(n, 1), n, seconds)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine down to 0 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress_frac = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_frac)))
