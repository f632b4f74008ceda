"""How a run's fine-tuning steps run, and the rules that decide it: pure functions of the options, the CPU's facts
and what was measured on this machine (no torch here, so the rules are tested without training anything).

- precision: bf16 autocast (fp32 master weights) only where the CPU has bf16 in hardware (``avx512_bf16`` or
  ``amx_bf16``) *and* it measured faster; elsewhere PyTorch emulates bf16 and a step gets slower (on machine C,
  AVX2 only, several times slower: benchmarks/RESULTS.md). Validation, best.pt, export and verification are fp32
  whatever the training precision.
- compile: ``torch.compile`` (inductor) only where it was measured on this machine, for this model, input and
  batch, and its steady-state saving over the steps planned outweighs the time it takes to compile. A compile that
  was never measured is not paid for blindly: ``--compile on`` measures it once, and later ``auto`` runs decide
  from that.
- threads: one per physical core (hyper-threads share a core's vector units; oneDNN's convolutions are faster
  without them), unless ``--threads`` says otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from tledge.train.speed.cpu import CpuFacts

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
BF16_MIN_GAIN = 1.10  # bf16 must be this much faster than fp32 to be chosen: it costs accuracy headroom
COMPILE_MIN_GAIN = 1.05  # steady-state speed-up below this is within the noise of a shared machine


@dataclass(frozen=True)
class SpeedChoice:
    """How this run's fine-tuning steps run: decided at run start, printed once, saved in metrics.json."""

    device: str  # cpu | cuda
    precision: str  # fp32 | bf16 (CPU autocast, fp32 master weights) | amp (CUDA autocast, --no-amp turns it off)
    compile: bool  # the training forward and backward through torch.compile (inductor)
    threads: Optional[int]  # torch intra-op threads while training (CPU); None: left as PyTorch set them
    speedups: bool  # frozen BatchNorm folded into its convolution, fused optimizer step, allocations kept
    reasons: tuple[str, ...] = ()  # one phrase per decision, in words
    measured: dict[str, Any] = field(default_factory=dict)  # the numbers behind the decisions (images/s, seconds)
    source: str = "rules"  # measured (this run's probe) | cached (an earlier run's, this machine) | rules
    cache_key: str = ""  # where this machine's measurements are kept in $TLEDGE_CACHE/train/choices.json
    thread_wait: str = "default"  # OMP_WAIT_POLICY when torch loaded: passive (idle threads sleep) | active | default

    def line(self) -> str:
        """The one line a run prints about how it trains."""
        how = [self.precision, "compiled" if self.compile else "eager"]
        if self.threads is not None:
            how.append(f"{self.threads} thread{'s' if self.threads != 1 else ''}"
                       + (" (idle ones sleep)" if self.thread_wait == "passive" else ""))
        how.append("speed-ups on" if self.speedups else "speed-ups off")
        source = self.source
        if source == "measured" and "probe_seconds" in self.measured:
            source = f"measured in {self.measured['probe_seconds']}s"
        return f"fine-tuning on {self.device}: {', '.join(how)} ({source}; " + "; ".join(self.reasons) + ")"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


PLAIN = SpeedChoice("cpu", "fp32", False, None, False, ("the plain loop",))  # before a probe has decided


def decide_precision(option: str, cpu: CpuFacts, measured: dict[str, Any]) -> tuple[str, str]:
    """``(fp32|bf16, why)`` for ``--precision option`` on this CPU, given the probe's ``fp32_images_per_s`` and
    ``bf16_images_per_s`` (measured only where bf16 is native)."""
    if option == "fp32":
        return "fp32", "fp32 as asked"
    if option == "bf16":
        native = "bf16 in hardware" if cpu.native_bf16 else "emulated: no avx512_bf16/amx_bf16 here, expect it slower"
        return "bf16", f"bf16 as asked ({native})"
    if not cpu.native_bf16:
        return "fp32", "fp32: no bf16 in hardware (avx512_bf16/amx_bf16)"
    fp32, bf16 = measured.get("fp32_images_per_s"), measured.get("bf16_images_per_s")
    if fp32 and bf16 and bf16 >= BF16_MIN_GAIN * fp32:
        return "bf16", f"bf16: {bf16 / fp32:.2f}x the images/s of fp32 here"
    if fp32 and bf16:
        return "fp32", f"fp32: bf16 measured only {bf16 / fp32:.2f}x here"
    return "fp32", "fp32: bf16 not measured"


def decide_compile(option: str, measured: Optional[dict[str, Any]], planned_images: int,
                   distributed: bool) -> tuple[bool, str]:
    """``(compile?, why)``. ``measured``: an earlier measurement on this machine (``seconds`` to compile,
    ``images_per_s`` compiled and ``eager_images_per_s`` beside it); ``planned_images``: images the fine-tuning
    phase will train on."""
    if option == "on":
        return True, "compile as asked"
    if option == "off":
        return False, "eager as asked"
    if distributed:
        return False, "eager: compile is not tried with several processes"
    if not measured:
        return False, "eager: compile not measured on this machine (--compile on measures it once)"
    compiled, eager, seconds = measured["images_per_s"], measured["eager_images_per_s"], measured["seconds"]
    saved = planned_images / eager - planned_images / compiled  # seconds, negative when compiled is slower
    if compiled >= COMPILE_MIN_GAIN * eager and saved > seconds:
        return True, f"compiled: {compiled / eager:.2f}x eager here, saves {saved:.0f}s for {seconds:.0f}s of compiling"
    return False, (f"eager: compiled ran {compiled / eager:.2f}x eager here and takes {seconds:.0f}s to compile "
                   f"(would save {max(saved, 0):.0f}s over {planned_images} images)")


def decide_threads(option: Optional[int], cpu: CpuFacts, measured: Optional[dict[str, float]]) -> tuple[int, str]:
    """``(threads, why)``: ``--threads``, else one per physical core, or one per CPU where hyper-threads measured
    faster (``measured``: images/s by thread count, from the probe)."""
    if option is not None:
        return option, f"{option} thread{'s' if option != 1 else ''} as asked"
    if measured and cpu.cpus != cpu.cores:
        per_core, per_cpu = measured.get(str(cpu.cores), 0.0), measured.get(str(cpu.cpus), 0.0)
        if per_cpu > per_core:
            return cpu.cpus, f"{cpu.cpus} threads: one per CPU measured {per_cpu / max(per_core, 1e-9):.2f}x one per core"
    return cpu.cores, f"{cpu.cores} thread{'s' if cpu.cores != 1 else ''}: one per physical core"
