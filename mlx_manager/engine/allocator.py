"""glibc's malloc, tuned for MLX's CPU buffers (Linux).

On the CPU, MLX allocates every intermediate array with malloc and frees it when the array dies:
a prompt chunk's forward pass makes and drops hundreds of buffers of a few megabytes. glibc serves
a request above its mmap threshold with a fresh mmap and returns it with munmap on free; the
threshold adapts as blocks are freed, but it lags behind a model's changing sizes (every chunk,
every context length), and buffers mapped afresh land at page-aligned addresses. Measured here, an
element-wise kernel over a 6 MB array took 12–30 ms instead of 3 ms, depending only on the array's
exact size; with the thresholds below, 3–5 ms for every size. (Which cost it was, page faults on
fresh mappings or input and output buffers aliasing in the CPU's cache at the same page offset, was
not pinned down: this VM's fault counters showed none.)

Fixing the mmap threshold at its maximum (32 MiB: larger blocks, such as weights and long KV
caches, still get their own mapping) and keeping up to `TRIM` of free memory at the top of the
heap lets those buffers be reused from the heap, already mapped. The cost is memory: the process
keeps up to `TRIM` more than it uses at the moment, which it will use again at the next chunk.

A user's own `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` is left alone. Not glibc (macOS,
musl): nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("mlx_manager.engine")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM = 128 << 20
_done: list[bool] = []


def tune() -> bool:
    """Set the thresholds once per process; whether they were set."""
    if _done:
        return _done[0]
    _done.append(_tune())
    return _done[0]


def _tune() -> bool:
    if not sys.platform.startswith("linux") or os.environ.keys() & {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}:
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM) != 1:
        log.warning("could not tune malloc for MLX's buffers (mallopt refused)")
        return False
    return True
