"""A real memory limit for one process, the ``memcap`` fault (``DUET_FAULT=memcap@step=N``): from step N
the process has less memory than its plan assumed, as when another process takes part of a GPU or of a
host's RAM for a while, and the step's own allocations fail in the allocator (nothing is raised by
hand). The OOM policy (training/run/policies.py) must recognise the allocator's failure, whichever
device's words it comes in, re-plan and resume. The limit holds for the attempt it fired in: the engine
lifts it when it catches the OOM (``lift()``).

- CUDA: ``torch.cuda.set_per_process_memory_fraction``: the caching allocator refuses to reserve past
  the fraction (after freeing its cache and retrying) with torch.OutOfMemoryError;
- CPU: ``RLIMIT_AS`` (the address space): torch's CPU allocator fails with "DefaultCPUAllocator: can't
  allocate memory". Why not for the whole run: on CPU the address space is more than memory (an
  attempt maps thread stacks, and oneDNN maps JIT code for each new shape), so a limit that a smaller
  step would fit in terms of tensors still fails a new attempt elsewhere (measured: "could not create
  a primitive" in the backward of the half micro-batch).

On CUDA the limit leaves ``headroom`` (0.5) of what the steps so far took beyond what is allocated
between steps (the caching allocator's peak reservation above the allocated bytes): the step cannot
reserve its peak again. On CPU the limit is the address space mapped now (after handing free heap back):
no new mapping. It lowers glibc's mmap threshold for the capped attempt (``infra.malloc.small_mappings``;
the executor's own threshold is high, for speed), so a step's tensors are new mappings, refused at the first large one (a measured "what a step took"
would be sampled, and a step's history in the process decides how much of it reuses free heap: found
when a limit from the sampled step let the step fit after other runs in the same process).
"""

from __future__ import annotations

import resource

from infra.lazy import lazy

torch = lazy("torch", extra="executor")
_state: dict = {}


def apply(device: str, headroom: float = 0.5) -> dict:
    """Limit this process's memory for the rest of the attempt (see the module). Returns what was set,
    for the run's events."""
    if device == "cuda":
        held = torch.cuda.memory_allocated()
        step = max(0, torch.cuda.max_memory_reserved() - held)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        limit = held + headroom * step
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        _state["cuda"] = True
        return {"device": "cuda", "limit_bytes": int(limit), "held_bytes": int(held), "step_bytes": int(step),
                "total_bytes": int(total), "as": "torch.cuda.set_per_process_memory_fraction"}
    import psutil

    from infra import malloc

    malloc.small_mappings(True)
    malloc.no_new_arenas(True)
    _state["small_mappings"] = True
    # oneDNN off while capped: an allocation it fails leaves its primitives failing in later attempts too
    # (measured: "could not create a primitive" after the limit was lifted); torch's own kernels fail cleanly
    _state["mkldnn"] = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    malloc.trim()
    info = psutil.Process().memory_info()
    old = resource.getrlimit(resource.RLIMIT_AS)
    _state.setdefault("rlimit", old)
    resource.setrlimit(resource.RLIMIT_AS, (info.vms, old[1]))
    return {"device": "cpu", "limit_bytes": int(info.vms), "held_bytes": int(info.rss), "mapped_bytes": int(info.vms),
            "as": "RLIMIT_AS"}


def lift() -> None:
    """The process's memory as it was before ``apply``."""
    if _state.pop("cuda", None):
        torch.cuda.set_per_process_memory_fraction(1.0)
    old = _state.pop("rlimit", None)
    if old is not None:
        resource.setrlimit(resource.RLIMIT_AS, old)
    if _state.pop("small_mappings", None):
        from infra import malloc

        malloc.small_mappings(False)
        malloc.no_new_arenas(False)
    if "mkldnn" in _state:
        torch.backends.mkldnn.enabled = _state.pop("mkldnn")


def active() -> bool:
    return bool(_state)
