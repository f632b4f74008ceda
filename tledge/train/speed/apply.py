"""Process settings the fine-tuning phase runs under: threads, how idle threads wait, and glibc keeping freed
activation memory.

PyTorch's CPU kernels run on OpenMP threads, and libgomp's idle threads spin (burn a core) for a while before they
sleep. On a machine whose cores are shared with other processes a spinning thread holds a core that the thread it
waits for needs, and every one of a step's few thousand parallel regions waits for a descheduled thread: on
machine C under another job's load, a Lite0 step took 2.0x as long with 2 spinning threads as with 1, and as
long with 2 sleeping threads as with 1. :func:`prefer_sleeping_threads` sets ``OMP_WAIT_POLICY=PASSIVE`` for the
`tledge finetune` process; libgomp reads it once, when torch loads, so it is set before any torch import and
never over a value the user chose.

Every training step allocates and frees the same few hundred activation tensors, most larger than glibc's largest
mmap threshold (32 MiB). By default each of them is a fresh ``mmap`` and ``munmap``, so every step faults in and
zeroes its activations' pages again: on machine C that was ~1.2 s of kernel time per Lite0 step at 224 px (434,000
page faults), about a sixth of the CPU a step used. Raising the thresholds makes glibc reuse the freed memory
instead, as PyTorch's CUDA caching allocator does on a GPU; the process keeps its peak training memory mapped
until the phase ends, when :func:`release_allocations` hands the free part back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from typing import Optional

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 1 << 30  # 1 GiB: above any single activation of the supported models at their sizes
_DEFAULT_MMAP, _DEFAULT_TRIM = 128 * 1024, 128 * 1024  # glibc's initial values (bytes)


def _libc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None  # musl, macOS, Windows: their allocators have no such knobs
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_allocations() -> bool:
    """Let glibc reuse freed activation memory instead of unmapping it; False where that is not possible."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def release_allocations() -> None:
    """glibc's thresholds back to their initial values, and the free memory back to the system."""
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
    libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
    libc.malloc_trim(0)


def prefer_sleeping_threads() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy; only before torch is imported (no effect after)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def openmp_wait_policy() -> str:
    """How this process's OpenMP threads wait (what the environment said when torch loaded, as far as tledge can
    tell): passive (sleep), active (spin) or default (libgomp: spin a while, then sleep)."""
    return os.environ.get("OMP_WAIT_POLICY", "default").strip().lower() or "default"


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads (the ones convolutions use); None leaves them as they are."""
    import torch

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
