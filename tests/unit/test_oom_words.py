"""What the OOM policy takes for an allocation that failed, on each device (issue 36)."""

import pytest

from training.run.policies import out_of_memory


class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name, as CUDA's caching allocator raises it
    pass


@pytest.mark.parametrize("exc", [
    OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 32096072 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    MemoryError(),
    OSError(12, "Cannot allocate memory (os error 12)"),
])
def test_every_allocators_words_are_an_oom(exc):
    assert out_of_memory(exc)


@pytest.mark.parametrize("exc", [RuntimeError("shape mismatch"), ValueError("out of memory budget in the config"),
                                 KeyError("CUDA out of memory"),
                                 OSError(2, "No such file or directory")])
def test_other_errors_are_not(exc):
    assert not out_of_memory(exc)


def test_a_real_cpu_allocation_failure_is_one():
    """torch's CPU allocator under a real limit (a child process, so this one keeps its memory)."""
    import subprocess
    import sys

    code = ("import resource, psutil, torch\n"
            "from training.run.policies import out_of_memory\n"
            "v = psutil.Process().memory_info().vms\n"
            "resource.setrlimit(resource.RLIMIT_AS, (v + (64 << 20), resource.RLIM_INFINITY))\n"
            "try:\n    torch.empty(512 << 20, dtype=torch.uint8)\nexcept Exception as e:\n"
            "    print(type(e).__name__, out_of_memory(e))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "RuntimeError True", r.stderr[-2000:]
