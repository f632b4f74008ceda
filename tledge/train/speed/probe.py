"""The probe at run start: a few seconds that decide how this machine fine-tunes this model, cached per machine.

What it measures, on a copy of the run's model with synthetic images (the run's model, data and RNGs are left
untouched), and only what a decision needs:

- that folding frozen BatchNorm into its convolution computes the same logits and gradients as the plain model
  (a forward and backward of two images each way): the speed-ups never change results silently;
- on a CPU with bf16 in hardware and ``--precision auto``: fp32 and bf16 training steps, interleaved;
- on a CPU with hyper-threads and no ``--threads``: a step with one thread per core and one per CPU.

The numbers go to ``$TLEDGE_CACHE/train/choices.json`` (:mod:`tledge.train.speed.cache`) under a key of the CPU
(model, flags, cores), torch's version, the architecture, input size and batch: later runs read them. A compile
measured by ``--compile on`` (:mod:`tledge.train.speed.step`) is kept under the same key.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import time
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tledge.train.speed import cache
from tledge.train.speed.apply import openmp_wait_policy, set_threads
from tledge.train.speed.choice import SpeedChoice, decide_compile, decide_precision, decide_threads
from tledge.train.speed.cpu import CpuFacts, read_cpu
from tledge.train.speed.fold import find_pairs, folded

log = logging.getLogger(__name__)

PROBE_BATCH = 8  # images per timed probe step: seconds at 224 px, and the ratios of a full batch hold
PROBE_STEPS = 2  # timed steps per configuration and round, after one warm-up step
PROBE_ROUNDS = 2  # configurations interleaved A, B, A, B: a shared machine's noise hits both alike
FOLD_TOLERANCE = 1e-3  # largest relative difference (logits, each gradient) folded vs plain; fp32 rounding is ~1e-6


def choose(net: nn.Module, cfg: Any, device: torch.device, size: int, planned_images: int,
           distributed: bool) -> SpeedChoice:
    """How the fine-tuning phase of this run trains (``cfg``: its FinetuneConfig; ``size``: input pixels)."""
    if device.type != "cpu":
        return SpeedChoice(device.type, "amp" if cfg.amp else "fp32", cfg.compile == "on", None, cfg.speedups,
                           (f"{'mixed precision' if cfg.amp else 'fp32'} on the GPU (--no-amp: fp32)",
                            decide_compile(cfg.compile, None, planned_images, distributed)[1]))
    cpu = read_cpu()
    threads, why_threads = decide_threads(cfg.threads, cpu, None)
    if planned_images == 0:  # head-only, or a resumed run past its last epoch: nothing to decide or measure
        return SpeedChoice("cpu", "fp32", False, threads, False, ("no fine-tuning phase", why_threads),
                           thread_wait=openmp_wait_policy())
    key = cache_key(cpu, cfg.arch, size, cfg.batch_size)
    entry = cache.read_entry(key) or {}
    source = "cached" if entry else "rules"
    fresh = _measure_missing(net, cfg, cpu, size, entry)
    if fresh:
        entry = {**entry, **fresh, "measured": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                 "cpu": cpu.describe(), "torch": torch.__version__}
        cache.write_entry(key, entry)
        source = "measured"
    threads, why_threads = decide_threads(cfg.threads, cpu, entry.get("threads_images_per_s"))
    precision, why_precision = decide_precision(cfg.precision, cpu, entry)
    compiled, why_compile = decide_compile(cfg.compile, entry.get("compile"), planned_images, distributed)
    speedups, why_speedups = cfg.speedups, "speed-ups off as asked"
    if speedups:
        error = entry.get("fold_error")
        speedups = error is not None and error <= FOLD_TOLERANCE
        why_speedups = (f"folded BatchNorm matches the plain model to {error:.1e}" if speedups else
                        f"speed-ups off: folded BatchNorm differs from the plain model by {error}")
    return SpeedChoice("cpu", precision, compiled, threads, speedups,
                       (why_precision, why_compile, why_threads, why_speedups),
                       {k: v for k, v in entry.items() if k not in ("cpu", "torch")}, source, key,
                       openmp_wait_policy())


def cache_key(cpu: CpuFacts, arch: str, size: int, batch: int) -> str:
    """What a measurement depends on: a different CPU, torch, model, input or batch measures again."""
    return "|".join([cpu.model, ",".join(cpu.flags), f"cores={cpu.cores}", f"cpus={cpu.cpus}", platform.machine(),
                     f"torch={torch.__version__}", arch, f"{size}px", f"batch={batch}"])


def _measure_missing(net: nn.Module, cfg: Any, cpu: CpuFacts, size: int, entry: dict[str, Any]) -> dict[str, Any]:
    """What this run needs and the cache does not hold yet."""
    fresh: dict[str, Any] = {}
    with _scratch(net) as copy_of_net:
        if cfg.speedups and entry.get("fold_error") is None:
            fresh["fold_error"] = fold_error(copy_of_net, size)
        if cfg.precision == "auto" and cpu.native_bf16 and "bf16_images_per_s" not in entry:
            fresh.update(zip(("fp32_images_per_s", "bf16_images_per_s"),
                             interleaved(copy_of_net, size, [dict(precision="fp32"), dict(precision="bf16")])))
        if cfg.threads is None and cpu.cpus != cpu.cores and "threads_images_per_s" not in entry:
            counts = [cpu.cores, cpu.cpus]
            speeds = interleaved(copy_of_net, size, [dict(threads=n) for n in counts])
            fresh["threads_images_per_s"] = {str(n): s for n, s in zip(counts, speeds)}
    return fresh


@contextlib.contextmanager
def _scratch(net: nn.Module) -> Iterator[nn.Module]:
    """A copy of ``net`` to train on (BatchNorm in inference mode, as fine-tuning has it); torch's RNG and thread
    count as they were afterwards."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scratch = copy.deepcopy(net).train()
        for m in scratch.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        try:
            yield scratch
        finally:
            torch.set_num_threads(threads)


def _batch(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
    return x, torch.arange(n) % 2


def fold_error(net: nn.Module, size: int) -> float:
    """Largest relative difference between the folded and the plain model: logits, then each gradient."""
    x, y = _batch(size, 2)
    pairs = find_pairs(net, x)

    def run() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        logits = net(x)
        F.cross_entropy(logits, y).backward()
        return [logits.detach()] + [p.grad.clone() for p in net.parameters() if p.grad is not None]

    with torch.random.fork_rng(devices=[]):  # the same dropout draws both times
        plain = run()
    with folded(pairs):
        fold = run()
    net.zero_grad(set_to_none=True)
    if len(plain) != len(fold) or not pairs:
        return float("inf")
    return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(fold, plain))


def interleaved(net: nn.Module, size: int, configs: list[dict[str, Any]]) -> list[float]:
    """Training images/s of each configuration (``precision``, ``threads``), timed in turns, best round each."""
    x, y = _batch(size, PROBE_BATCH)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)  # any step will do: only its time is kept
    for config in configs:  # one untimed step each: oneDNN picks and caches its kernels on the first
        _time_steps(net, opt, x, y, 1, **config)
    best = [0.0] * len(configs)
    for _ in range(PROBE_ROUNDS):  # noise only ever slows a round down: the best round of each is its speed
        for i, config in enumerate(configs):
            best[i] = max(best[i], _time_steps(net, opt, x, y, PROBE_STEPS, **config))
    return [round(b, 2) for b in best]


def _time_steps(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
                precision: str = "fp32", threads: Optional[int] = None) -> float:
    set_threads(threads)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t0)
