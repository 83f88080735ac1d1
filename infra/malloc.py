"""Keeping a long run's memory flat on Linux (glibc).

A training step frees and allocates tensors of many sizes (every batch has its own sequence length);
glibc's allocator keeps freed memory in its heaps and fragments them, so a process's RSS grows step
after step although what it holds does not (measured: 160 KB a step on a tiny model, on CPU).
``trim()`` hands free heap pages back (called every few hundred steps; glibc trims every arena); ``tame()``
fixes the thresholds. Elsewhere (macOS, musl) both do nothing.

The mmap threshold is fixed at 32 MiB (glibc's own ceiling), not low: a block above the threshold is a
new mapping, whose pages the kernel faults in and zeroes on every allocation. At 64 KiB every activation
of a step was one, and a SmolLM2 LoRA step took 1.9x as long (3.87 s against 2.01 s, a plain TRL script
with glibc's tunables set as tame() set them; issue 37), most of it system time. Fixed at the ceiling,
tensors are reused from the heap as in a plain script (2.1 s), and the trims keep RSS in check.

The arenas are not capped: with ``arena_max=2`` the step took 1.32x as long (2.80 s against 2.12 s, the
same plain script with only that tunable set; 4 arenas: 1.10x; 8: 1.00x), as torch's worker threads
and the training thread queued on two heaps' locks. That cap was most of the executor's overhead
against a plain script (benchmarks/trl_compare.py).
``small_mappings()`` lowers it again for the memcap fault only (training/run/memory_cap.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20
SMALL_MMAP_THRESHOLD = 64 << 10
TRIM_THRESHOLD = 128 << 20


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
    return all(lib.mallopt(k, v) for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


def trim() -> None:
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


_base = [MMAP_THRESHOLD]  # this process's threshold outside a memcap attempt


def small_mappings(on: bool = True, *, for_process: bool = False) -> bool:
    """Every block above 64 KiB a mapping of its own (``on``), or back to this process's threshold: a
    limit on the address space then refuses a step's first large tensor (training/run/memory_cap.py).
    ``for_process``: make it this process's threshold (QLoRA on CPU: bitsandbytes dequantizes each
    weight to a fresh fp32 copy every forward, and from the heap those copies fragmented it: the
    vram_planner's CPU QLoRA row peaked at 1.47x its estimate with the high threshold, 0.975x with
    this one)."""
    lib = _libc()
    if for_process:
        _base[0] = SMALL_MMAP_THRESHOLD if on else MMAP_THRESHOLD
    return lib is not None and bool(lib.mallopt(M_MMAP_THRESHOLD, SMALL_MMAP_THRESHOLD if on else _base[0]))


def no_new_arenas(on: bool = True) -> bool:
    """No new arena while ``on`` (threads share the arenas there are), else glibc's default limit (8 a
    core). Each new arena reserves 64 MiB of address space, which a limit on it (training/run/memory_cap.py)
    refuses in a thread's first allocation."""
    import os

    lib = _libc()
    return lib is not None and bool(lib.mallopt(M_ARENA_MAX, 1 if on else 8 * (os.cpu_count() or 1)))
