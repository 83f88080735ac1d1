"""Peak memory of each phase of a run (load, evaluation, training, merge, sampling), measured.

A background thread samples the process's resident memory every ``interval`` seconds (and on CUDA
``torch.cuda.memory_reserved()``); the peak
of each phase lands in run.json as ``phase_peaks`` next to the planner's estimate of the same phase
(``training.plan.planner.phase_estimates``), so a plan is checked against every phase, not only training.
"""

from __future__ import annotations

import gc
import resource
import sys
import threading
from infra.lazy import lazy

torch = lazy("torch", extra="executor")


class PhasePeaks:
    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peaks: dict[str, dict] = {}
        self.phase = "start"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = None

    def _sample(self) -> None:
        import psutil

        if self._cuda is None:
            try:
                import torch

                self._cuda = torch if torch.cuda.is_available() else False
            except ImportError:
                self._cuda = False
        info = psutil.Process().memory_info()
        rss = info.rss
        # the caching allocator keeps what it reserved until empty_cache(), so a sample holds a phase's
        # peak reservation; torch's own max_memory_reserved() is left alone for the engine's readers
        reserved = self._cuda.cuda.memory_reserved() if self._cuda else None
        with self._lock:
            p = self.peaks.setdefault(self.phase, {"rss_bytes": 0})
            p["rss_bytes"] = max(p["rss_bytes"], rss)
            p["vms_bytes"] = max(p.get("vms_bytes", 0), info.vms)  # the address space (memory_cap's CPU limit)
            if reserved is not None:
                p["cuda_reserved_bytes"] = max(p.get("cuda_reserved_bytes", 0), reserved)

    def enter(self, phase: str) -> None:
        self._sample()
        with self._lock:
            self.phase = phase
        self._sample()

    def start(self) -> "PhasePeaks":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="duet-phase-peaks", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # never take the run down for a memory reading
                pass

    def stop(self) -> dict[str, dict]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sample()
        return self.snapshot()

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self.peaks.items()}


def peak_rss() -> int:
    """This process's peak RSS (VmHWM: since its exec, or since ``reset_peak_rss``; ru_maxrss keeps the
    parent's peak across a fork and cannot be reset)."""
    try:
        for line in open("/proc/self/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``5 > /proc/self/clear_refs``, Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_memory_bytes() -> dict:
    out = {"rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except ImportError:
        pass
    return out



def release_memory() -> None:
    """Give freed memory back: torch's CUDA cache, and on Linux the C heap (glibc keeps freed
    blocks mapped, so without a trim the merge would run on top of training's high-water mark)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass



def training_peak(peaks: PhasePeaks | None) -> int:
    """The peak of the training just done: torch's own on CUDA (reset before train()), else the
    phase sampler's RSS (a per-step reading misses the peak inside a step: 2.9 GB vs 3.6 GB
    on the demo)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved()
    if peaks is not None:
        return peaks.snapshot().get("training", {}).get("rss_bytes", 0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



def phase_report(peaks: PhasePeaks, plan: dict) -> dict:
    """Each phase's measured peak next to the planner's estimate of it (run.json ``phases``)."""
    measured = peaks.snapshot()
    est = (plan.get("estimate") or {}).get("phases") or {}
    key = "cuda_reserved_bytes" if plan.get("device") == "cuda" else "rss_bytes"
    out = {}
    for name, m in measured.items():
        row = {"measured_bytes": m.get(key, m["rss_bytes"]), "measured_as": key}
        if name in est:
            row["estimate_bytes"] = est[name]["total_bytes"] if key == "rss_bytes" else est[name]["reserved_bytes"]
            row["ratio_estimate_to_measured"] = round(row["estimate_bytes"] / max(1, row["measured_bytes"]), 3)
        out[name] = row
    return out
