"""Freed memory kept for reuse: glibc's malloc tuned for PyTorch on CPU (torch-free).

Every training step and every evaluated batch allocates tensors of a few megabytes and frees
them again. With glibc's defaults, blocks above its mmap threshold (128 KiB at first, raised as
it goes, to at most 32 MiB) come as fresh pages from the kernel and go back to it when freed, and
the heap is trimmed whenever more than 128 KiB lies free at its top: the next step then faults
in and zeroes the same megabytes again, until glibc's own thresholds have caught up: a process's
first training spent about a sixth of its CPU time in the kernel doing so. tcmalloc and jemalloc
keep freed memory by design; `keep_freed_memory` has glibc do the same (`scripts/bench_allocator.py`
measures it against glibc's defaults).
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's own ceiling for the threshold it raises as it goes, fixed from the start: blocks larger
# than this (a whole dataset as floats) are rare, and still handed back to the kernel when freed.
MMAP_THRESHOLD_BYTES = 32 << 20
# Up to this much free memory at the heap's top stays with the process for the next step.
TRIM_THRESHOLD_BYTES = 512 << 20


@cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where the C library
    is not glibc (musl, macOS), which is then left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc's own symbol: musl has a mallopt that does nothing)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def freed_memory_kept() -> bool:
    """Whether this process has the setting (a report's question; asking sets nothing)."""
    return keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()
