"""One fine-tuning step the way the run's :class:`~tledge.train.speed.choice.SpeedChoice` says: autocast precision,
frozen BatchNorm folded into its convolution, the forward and backward compiled or eager.

A compiled model is compiled for the batch shape it first sees; a smaller last batch of an epoch runs eagerly
rather than paying a second compile (both compute the same function). Under ``--compile on`` the first
compiled steps measure the compile against eager steps interleaved with them (same weights, same data
pipeline, the same minute) and keep the numbers in the probe's cache, so later ``--compile auto`` runs on this
machine decide from a measurement.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tledge.train.speed import cache
from tledge.train.speed.choice import SpeedChoice
from tledge.train.speed.fold import find_pairs, folded

log = logging.getLogger(__name__)

COMPARE_STEPS = 3  # compiled and eager steps, alternated, after the compile: what --compile on measures


class TrainStep:
    """``step(opt, x, y) -> (loss, logits)``: forward, loss, backward and optimizer step of one batch."""

    def __init__(self, model: nn.Module, net: nn.Module, choice: SpeedChoice, *, label_smoothing: float,
                 example: torch.Tensor, scaler: Optional[torch.amp.GradScaler] = None, measure_compile: bool = False):
        self.model, self.choice, self.scaler, self.label_smoothing = model, choice, scaler, label_smoothing
        # Folding needs BatchNorm frozen: with --train-bn (statistics updated every step) there is nothing to fold.
        frozen = not any(m.training for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self.pairs = find_pairs(net, example) if choice.speedups and frozen else []
        self.compiled = torch.compile(model) if choice.compile else None
        self.full_batch: Optional[int] = None  # the batch size the compiled graph was made for
        self.timings: Optional[dict[str, list[float]]] = {"compiled": [], "eager": []} if measure_compile else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: training steps (BatchNorm folded). Outside: the model as it is, for validation and saving."""
        with folded(self.pairs):
            yield

    def __call__(self, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        forward, which = self._forward_for(len(x))
        t0 = time.perf_counter()
        with self._autocast(x.device):
            logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()
        value = loss.item()  # waits for the step to finish: the time below is the whole step's
        self._record(which, time.perf_counter() - t0, len(x))
        return value, logits

    def _forward_for(self, n: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        if self.compiled is None:
            return self.model, "eager"
        if self.full_batch is None:
            self.full_batch = n
        if n != self.full_batch:
            return self.model, "tail"
        timings = self.timings
        if timings is not None and 1 <= len(timings["compiled"]) and len(timings["eager"]) < COMPARE_STEPS \
                and len(timings["eager"]) < len(timings["compiled"]) - 1:
            return self.model, "eager"  # interleaved with the compiled steps while --compile on measures
        return self.compiled, "compiled"

    def _autocast(self, device: torch.device):
        if self.choice.precision == "bf16" and device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.choice.precision == "amp" and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return contextlib.nullcontext()

    def _record(self, which: str, seconds: float, n: int) -> None:
        timings = self.timings
        if timings is None or which not in timings:
            return
        timings[which].append(seconds)  # one full batch each
        if len(timings["compiled"]) == COMPARE_STEPS + 1 and len(timings["eager"]) == COMPARE_STEPS:
            _store_compile_measurement(self.choice, timings, n)
            self.timings = None


def _store_compile_measurement(choice: SpeedChoice, timings: dict[str, list[float]], batch: int) -> None:
    """Compile seconds (the first compiled step less a steady one) and steady images/s, compiled and eager."""
    steady, eager = min(timings["compiled"][1:]), min(timings["eager"])
    measured: dict[str, Any] = {"seconds": round(timings["compiled"][0] - steady, 1),
                                "images_per_s": round(batch / steady, 2), "eager_images_per_s": round(batch / eager, 2),
                                "measured": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    log.info("compile measured: %.0fs to compile, then %.2f images/s compiled against %.2f eager (%.2fx); later "
             "--compile auto runs on this machine decide from this", measured["seconds"], measured["images_per_s"],
             measured["eager_images_per_s"], measured["images_per_s"] / measured["eager_images_per_s"])
    if choice.cache_key:
        entry = cache.read_entry(choice.cache_key) or {}
        cache.write_entry(choice.cache_key, {**entry, "compile": measured})
