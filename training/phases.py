"""Peak memory of each phase of a run (load, evaluation, training, merge, sampling), measured.

A background thread samples the process's resident memory every ``interval`` seconds (and on CUDA
``torch.cuda.memory_reserved()``); the peak
of each phase lands in run.json as ``phase_peaks`` next to the planner's estimate of the same phase
(``training.plan.phase_estimates``), so a plan is checked against every phase, not only training.
"""

from __future__ import annotations

import threading


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
        rss = psutil.Process().memory_info().rss
        # the caching allocator keeps what it reserved until empty_cache(), so a sample holds a phase's
        # peak reservation; torch's own max_memory_reserved() is left alone for the engine's readers
        reserved = self._cuda.cuda.memory_reserved() if self._cuda else None
        with self._lock:
            p = self.peaks.setdefault(self.phase, {"rss_bytes": 0})
            p["rss_bytes"] = max(p["rss_bytes"], rss)
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

