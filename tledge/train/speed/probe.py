"""The probe at run start: a few seconds that decide how this machine fine-tunes this model, cached per machine.

What it measures, on a copy of the run's model (the run's model, data and RNGs are left untouched), and only
what a decision needs and the cache does not hold:

- that folding frozen BatchNorm into its convolution computes the same logits and gradients as the plain model
  (a forward and backward of two of the run's images each way): the speed-ups never change results silently;
- on a CPU with bf16 in hardware and ``--precision auto``: fp32 and bf16 training steps on synthetic images,
  interleaved;
- on a CPU with hyper-threads and no ``--threads``: a step with one thread per core and one per CPU.

On a CPU without bf16 or hyper-threads (machine C) that is the folding check alone: about a second, once.

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

from tledge.models import train_mode
from tledge.train.speed import cache
from tledge.train.speed.apply import openmp_wait_policy, set_threads
from tledge.train.speed.choice import SpeedChoice, decide_compile, decide_precision, decide_threads
from tledge.train.speed.cpu import CpuFacts, read_cpu
from tledge.train.speed.fold import find_pairs, folded

log = logging.getLogger(__name__)

PROBE_BATCH = 8  # images per timed probe step: seconds at 224 px, and the ratios of a full batch hold
PROBE_STEPS = 2  # timed steps per configuration and round, after one warm-up step
PROBE_ROUNDS = 2  # configurations interleaved A, B, A, B: a shared machine's noise hits both alike
FOLD_LOGITS_TOLERANCE = 1e-4  # relative, folded vs plain; fp32 rounding is ~1e-6
FOLD_GRADIENTS_TOLERANCE = 1e-2  # relative, all gradients together; fp32 rounding is ~1e-3 (see fold_error)


def choose(net: nn.Module, cfg: Any, device: torch.device, size: int, planned_images: int, distributed: bool,
           example: Optional[torch.Tensor] = None) -> SpeedChoice:
    """How the fine-tuning phase of this run trains (``cfg``: its FinetuneConfig; ``size``: input pixels;
    ``example``: a few of the run's own images, normalised, for the folding check; synthetic ones without)."""
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
    entry = _well_formed(cache.read_entry(key) or {})
    source = "cached" if entry else "rules"
    t0 = time.perf_counter()
    fresh = _measure_missing(net, cfg, cpu, size, entry, example)
    if fresh:
        entry = {**entry, **fresh, "measured": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                 "probe_seconds": round(time.perf_counter() - t0, 1), "cpu": cpu.describe(), "torch": torch.__version__}
        cache.write_entry(key, entry)
        source = "measured"
    threads, why_threads = decide_threads(cfg.threads, cpu, entry.get("threads_images_per_s"))
    precision, why_precision = decide_precision(cfg.precision, cpu, entry)
    compiled, why_compile = decide_compile(cfg.compile, entry.get("compile"), planned_images, distributed)
    speedups, why_speedups = cfg.speedups, "speed-ups off as asked"
    if speedups:
        error = entry.get("fold_error")
        speedups = fold_matches(error)
        why_speedups = (f"folded BatchNorm matches the plain model: logits to {error['logits']:.0e}, gradients to "
                        f"{error['gradients']:.0e}" if speedups else
                        f"speed-ups off: folded BatchNorm differs from the plain model ({error})")
    return SpeedChoice("cpu", precision, compiled, threads, speedups,
                       (why_precision, why_compile, why_threads, why_speedups),
                       {k: v for k, v in entry.items() if k not in ("cpu", "torch")}, source, key,
                       openmp_wait_policy())


def _well_formed(entry: dict[str, Any]) -> dict[str, Any]:
    """The fields of a cached entry that have the shape this version writes; anything else is measured again."""
    def numbers(d: Any, keys: tuple[str, ...]) -> bool:
        return isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) and d[k] >= 0 for k in keys)

    kept = {k: v for k, v in entry.items() if k in ("measured", "cpu", "torch") and isinstance(v, str)}
    if isinstance(entry.get("probe_seconds"), (int, float)):
        kept["probe_seconds"] = entry["probe_seconds"]
    if numbers(entry.get("fold_error"), ("logits", "gradients")):
        kept["fold_error"] = entry["fold_error"]
    if numbers(entry, ("fp32_images_per_s", "bf16_images_per_s")):
        kept.update({k: entry[k] for k in ("fp32_images_per_s", "bf16_images_per_s")})
    threads = entry.get("threads_images_per_s")
    if isinstance(threads, dict) and numbers(threads, tuple(threads)):
        kept["threads_images_per_s"] = threads
    if numbers(entry.get("compile"), ("seconds", "images_per_s", "eager_images_per_s")) \
            and entry["compile"]["eager_images_per_s"] > 0 and entry["compile"]["images_per_s"] > 0:
        kept["compile"] = entry["compile"]
    return kept


def cache_key(cpu: CpuFacts, arch: str, size: int, batch: int) -> str:
    """What a measurement depends on: a different CPU, torch, model, input or batch measures again."""
    return "|".join([cpu.model, ",".join(cpu.flags), f"cores={cpu.cores}", f"cpus={cpu.cpus}", platform.machine(),
                     f"torch={torch.__version__}", arch, f"{size}px", f"batch={batch}"])


def _measure_missing(net: nn.Module, cfg: Any, cpu: CpuFacts, size: int, entry: dict[str, Any],
                     example: Optional[torch.Tensor]) -> dict[str, Any]:
    """What this run needs and the cache does not hold yet (nothing at all, usually: then nothing is copied)."""
    fold = cfg.speedups and entry.get("fold_error") is None
    bf16 = cfg.precision == "auto" and cpu.native_bf16 and "bf16_images_per_s" not in entry
    threads = cfg.threads is None and cpu.cpus != cpu.cores and "threads_images_per_s" not in entry
    fresh: dict[str, Any] = {}
    if not (fold or bf16 or threads):
        return fresh
    with _scratch(net) as copy_of_net:
        if fold:
            fresh["fold_error"] = fold_error(copy_of_net, example if example is not None else _batch(size, 2)[0])
        if bf16:
            fresh.update(zip(("fp32_images_per_s", "bf16_images_per_s"),
                             interleaved(copy_of_net, size, [dict(precision="fp32"), dict(precision="bf16")])))
        if threads:
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
        scratch = train_mode(copy.deepcopy(net))
        try:
            yield scratch
        finally:
            torch.set_num_threads(threads)


def _batch(size: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
    return x, torch.arange(n) % 2


def fold_error(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Relative differences (L2 norms) between the folded and the plain model on the batch ``x``: of the logits,
    and of all gradients together.

    fp32 rounding moves logits by ~1e-6. Gradients move more, ~1e-3 on real images, because a ReLU6 input that
    rounding tips over 0 or 6 switches its gradient on or off: the plain model in fp32 is itself ~1e-3 from the
    same model in float64 there. A wrong fold moves either by orders of magnitude more.
    """
    y = torch.arange(len(x)) % 2
    pairs = find_pairs(net, x)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        logits = net(x)
        F.cross_entropy(logits, y).backward()
        grads = [p.grad.flatten() for p in net.parameters() if p.grad is not None]
        return logits.detach(), torch.cat(grads) if grads else torch.zeros(0)

    with torch.random.fork_rng(devices=[]):  # the same dropout draws both times
        plain = run()
    with folded(pairs):
        fold = run()
    net.zero_grad(set_to_none=True)
    if not pairs or plain[1].shape != fold[1].shape:
        return {"logits": float("inf"), "gradients": float("inf")}
    logits, grads = (float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(fold, plain))
    return {"logits": logits, "gradients": grads}


def fold_matches(error: Optional[dict[str, float]]) -> bool:
    """Whether a :func:`fold_error` result is rounding, not a different function."""
    return bool(error) and error["logits"] <= FOLD_LOGITS_TOLERANCE and error["gradients"] <= FOLD_GRADIENTS_TOLERANCE


def interleaved(net: nn.Module, size: int, configs: list[dict[str, Any]]) -> list[float]:
    """Training images/s of each configuration (``precision``, ``threads``), timed in turns, best round each."""
    x, y = _batch(size, PROBE_BATCH)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)  # any step will do: only its time is kept
    threads = torch.get_num_threads()
    try:
        for config in configs:  # one untimed step each: oneDNN picks and caches its kernels on the first
            _time_steps(net, opt, x, y, 1, **config)
        best = [0.0] * len(configs)
        for _ in range(PROBE_ROUNDS):  # noise only ever slows a round down: the best round of each is its speed
            for i, config in enumerate(configs):
                best[i] = max(best[i], _time_steps(net, opt, x, y, PROBE_STEPS, **config))
    finally:
        torch.set_num_threads(threads)  # the process's threads as they were: a measurement changes nothing
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
