"""Process settings the fine-tuning phase runs under: threads, and glibc keeping freed activation memory.

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
import platform
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


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads (the ones convolutions use); None leaves them as they are."""
    import torch

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
