"""Fakes for what cannot run here (a GPU). Named as fakes; used only by tests."""

from __future__ import annotations


class FakeGpuSource:
    """A GPU reading scripted by the test: ``script(read_number, run) -> dict``; ``run`` (optional) is
    the Run whose watchdog reads it, so a script can react to the run's step or state."""

    def __init__(self, script, run=None, total_bytes: int = 24 * 2**30):
        self.script, self.run, self.total = script, run, total_bytes
        self.reads = 0
        self.name = "FAKE GPU (tests only)"

    def read(self) -> dict:
        self.reads += 1
        g = {"index": 0, "name": self.name, "memory_total_bytes": self.total, "memory_used_bytes": 0,
             "process_memory_bytes": 0,
             "slowdown_c": 90.0, "shutdown_c": 95.0}
        g.update(self.script(self.reads, self.run))
        return g


class Recorded:
    """Replays a recorded sequence of readings, one per read, then repeats the last."""

    def __init__(self, readings: list[dict]):
        self.readings = readings
        self.i = 0

    def __call__(self, _n, _run) -> dict:
        r = self.readings[min(self.i, len(self.readings) - 1)]
        self.i += 1
        return r


class FakeNcclRules:
    """Stands in for torch.distributed under NCCL's device rule, which cannot run here (no GPU): a
    collective takes tensors on the group's device only, and refuses others with NCCL's own words.
    Records every call; a broadcast leaves the tensor as it is (one process: rank 0's values)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.calls: list[tuple] = []

    def broadcast(self, tensor, src, **kw):
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        self.calls.append(("broadcast", str(tensor.device), src))

    def barrier(self, device_ids=None, **kw):
        self.calls.append(("barrier", device_ids))
