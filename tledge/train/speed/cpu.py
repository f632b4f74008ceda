"""What this CPU can do, from ``/proc/cpuinfo``: the facts the training probe decides on and keys its cache by.

Only flags that change a decision are kept: bfloat16 in hardware (``avx512_bf16``, ``amx_bf16``) is what makes
CPU autocast to bf16 pay; without it PyTorch emulates bf16 and a training step gets slower, not faster
(benchmarks/RESULTS.md, machine C). The rest (AVX2, AVX-512, VNNI, AMX tiles) are recorded with every choice so
a cached choice never crosses to a different CPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # either one: bf16 dot products in hardware


@dataclass(frozen=True)
class CpuFacts:
    model: str  # the "model name" line, e.g. "AMD EPYC"
    flags: tuple[str, ...]  # those of FLAGS_THAT_MATTER the CPU has, in that order
    cpus: int  # logical CPUs this process may run on (its affinity mask, not the whole machine)
    cores: int  # physical cores among them (hyper-threads of one core share its vector units)

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16)

    def describe(self) -> str:
        flags = ", ".join(self.flags) if self.flags else "no AVX2"
        return f"{self.model}, {self.cores} cores ({self.cpus} CPUs), {flags}"


def parse_cpuinfo(text: str, cpus: int) -> CpuFacts:
    """:class:`CpuFacts` from the text of ``/proc/cpuinfo`` (``cpus``: how many CPUs the process may use)."""
    model, flags, cores = "", set(), set()
    physical = core = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name == "model name" and not model:
            model = value
        elif name == "flags" and not flags:
            flags = set(value.split())
        elif name == "physical id":
            physical = value
        elif name == "core id":
            core = value
            cores.add((physical, core))
    n_cores = min(len(cores), cpus) if cores else cpus
    return CpuFacts(model or platform.processor() or "unknown CPU", tuple(f for f in FLAGS_THAT_MATTER if f in flags),
                    cpus, max(1, n_cores))


def read_cpu() -> CpuFacts:
    """This machine's :class:`CpuFacts` (a CPU without ``/proc/cpuinfo``, e.g. macOS, has no flags listed)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 22)  # 4 MiB: a 512-CPU machine's cpuinfo is under 1 MiB
    except OSError:
        text = ""
    return parse_cpuinfo(text, cpus)
