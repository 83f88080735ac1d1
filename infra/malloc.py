"""Keeping a long run's memory flat on Linux (glibc).

A training step frees and allocates tensors of many sizes (every batch has its own sequence length);
glibc's allocator keeps freed memory in its heaps and fragments them, so a process's RSS grows step
after step although what it holds does not (measured: 160 KB a step on a tiny model, on CPU). Large
blocks served by mmap go back to the system when freed; ``tame()`` lowers that threshold to 64 KiB
and ``trim()`` hands free heap pages back (called every few hundred steps). Elsewhere (macOS, musl)
both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 64 << 10
TRIM_THRESHOLD = 16 << 20
ARENAS = 2  # the training thread, the loss plot and the actor's threads share heaps instead of fragmenting their own


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt, lib.malloc_trim  # glibc only
        return lib
    except (OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def tame() -> bool:
    """Set the thresholds once per process (True when glibc took them)."""
    lib = _libc()
    if lib is None:
        return False
    return all(lib.mallopt(k, v) for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                             (M_ARENA_MAX, ARENAS)))


def trim() -> None:
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
