"""The executor's in-process watchdog: the same thresholds as infra/prometheus/rules.yml, evaluated
every second (and on every logged step) with no Prometheus needed.

Rules (names match the Prometheus alerts; thresholds configurable per run under ``watchdog:`` in the
plan's train section, see ``Thresholds``):

- ``gpu_memory_high``     the VRAM duet's training holds / the card's total > 0.90     warning
                          (above the planner's 85 %: a plan that fits does not alarm; the alert
                          says a run has grown past what was planned). duet's own processes only
                          (NVML's per-process use, else torch's reserved memory): another
                          process's memory on a shared card is context, never this alarm
- ``gpu_temperature_high`` temperature > min(85 C, the card's slowdown threshold - 5 C)  critical;
                          action: thermal pause (finish the step, checkpoint, wait) until it is
                          back under ``resume_below_c`` (75 C), then resume, unless paused by a user
- ``throughput_drop``     tokens/s < 80 % of the run's baseline (median of its first samples after
                          warm-up), for ``throughput_patience`` consecutive steps     warning
- ``grad_norm_high``      gradient norm > 10 for ``grad_norm_patience`` logged steps   critical
                          (the engine's policy then rolls back, see engine.py)
- ``grad_norm_vanishing`` gradient norm < 0.01 for ``grad_norm_patience`` logged steps  warning
- ``loss_nan``            a non-finite loss                                          critical
                          (the engine's policy rolls back)
- ``training_stalled``    a training step running for ``stall_seconds``               critical
                          (the clock runs only inside a step: model load, quantization, evaluation,
                          checkpoints and the merge are not stalls)

An alert fires once when its condition starts holding and re-arms when it clears. Each alert
becomes a run event (and so a session event once the architect records it), a log line, a
``duet_alerts_total`` count, and a webhook POST when ``webhook_url`` (or ``DUET_ALERT_WEBHOOK``) is
set. GPU readings come from a ``GpuSource``: ``NvmlSource`` on a real GPU, none on a machine without
one (GPU rules then never fire); tests pass their own, named as fakes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict
from typing import Callable, Protocol

from training.config import USABLE_FRACTION, Thresholds

log = logging.getLogger("duet.watchdog")
RULES = {"gpu_memory_high": "warning", "gpu_temperature_high": "critical", "throughput_drop": "warning",
         "grad_norm_high": "critical", "grad_norm_vanishing": "warning", "loss_nan": "critical",
         "training_stalled": "critical"}


class GpuSource(Protocol):
    def read(self) -> dict | None:
        """{"process_memory_bytes" (duet's training on this GPU), "memory_used_bytes" (the whole card's),
        "memory_total_bytes", "temperature_c", "slowdown_c"?, ...} or None."""


_tracked: dict[str, set[int]] = {}  # run id -> the pids of its data-parallel ranks (training/run/distributed.py)
_tracked_lock = threading.Lock()


def track_pids(key: str, pids: set[int] | None) -> None:
    """Count ``pids`` (a data-parallel run's ranks) as duet's training in GPU readings; None forgets them."""
    with _tracked_lock:
        if pids:
            _tracked[key] = set(pids)
        else:
            _tracked.pop(key, None)


def training_pids() -> set[int]:
    """This process (the executor, or a rank) and the ranks it follows."""
    with _tracked_lock:
        return {os.getpid()}.union(*_tracked.values())


def process_memory(procs, pids: set[int], torch_reserved=None) -> tuple[int | None, str | None]:
    """VRAM held by ``pids`` on one GPU: NVML's per-process figures (``procs``: its compute processes,
    each with ``pid`` and ``usedGpuMemory``) when NVML sees them; else this process's torch reserved
    memory (``torch_reserved()``; in a container NVML may show host pids, or none). (bytes, source)."""
    mine = [int(p.usedGpuMemory) for p in procs or [] if p.pid in pids and p.usedGpuMemory is not None]
    if mine:
        return sum(mine), "nvml"
    if torch_reserved is not None:
        r = torch_reserved()
        if r is not None:
            return int(r), "torch_reserved"
    return None, None


def _torch_reserved() -> int | None:
    try:
        import torch

        return torch.cuda.memory_reserved() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    except Exception:
        return None


def _torch_uuid() -> str | None:
    """The UUID of the GPU torch trains on (its current device: a data-parallel rank's own), when torch can say."""
    try:
        import torch

        if torch.cuda.is_available():
            dev = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
            u = getattr(torch.cuda.get_device_properties(dev), "uuid", None)
            return str(u) if u is not None else None
    except Exception:
        return None
    return None


def nvml_index(visible: str | None, nvml_uuids: list[str], torch_uuid: str | None = None) -> int:
    """NVML's index of the GPU the run uses (torch's cuda:0). NVML numbers every GPU of the host in
    PCI order and ignores CUDA_VISIBLE_DEVICES; CUDA numbers only the visible ones (by default the
    fastest first). So: the UUID torch reports when there is one; else the first entry of
    CUDA_VISIBLE_DEVICES (an index, or a UUID or its prefix such as GPU-5e3f); else 0."""
    def norm(u: str) -> str:
        u = u.strip().lower()
        return u[4:] if u.startswith("gpu-") else u

    uuids = [norm(u) for u in nvml_uuids]
    if torch_uuid:
        t = norm(torch_uuid)
        for i, u in enumerate(uuids):
            if u == t:
                return i
    first = (visible or "").split(",")[0].strip()
    if not first:
        return 0
    if first.isdigit():
        i = int(first)
        return i if i < max(1, len(uuids)) else 0
    f = norm(first)
    for i, u in enumerate(uuids):
        if u.startswith(f):
            return i
    return 0


class NvmlSource:
    """One GPU through NVML (nvidia-ml-py). Fields the card does not report are left out."""

    def __init__(self, index: int | None = None):
        import pynvml

        pynvml.nvmlInit()
        self.nv = pynvml
        if index is None:
            uuids = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                uuids.append(u.decode() if isinstance(u, bytes) else u)
            index = nvml_index(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids, _torch_uuid())
        self.index = index
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name

    @classmethod
    def detect(cls) -> "NvmlSource | None":
        try:
            src = cls()
            src.read()
            return src
        except Exception:  # no driver, no GPU, no nvidia-ml-py: no GPU metrics (absent, not zero)
            return None

    def read(self) -> dict:
        nv, h = self.nv, self.handle
        out: dict = {"index": self.index, "name": self.name}

        def get(key, fn):
            try:
                out[key] = fn()
            except Exception:
                pass

        mem = nv.nvmlDeviceGetMemoryInfo(h)
        out["memory_used_bytes"], out["memory_total_bytes"] = int(mem.used), int(mem.total)
        try:
            procs = nv.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception:
            procs = []
        used, source = process_memory(procs, training_pids(), _torch_reserved)
        if used is not None:
            out["process_memory_bytes"], out["process_memory_source"] = used, source
        get("temperature_c", lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
        get("slowdown_c", lambda: float(nv.nvmlDeviceGetTemperatureThreshold(h, nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)))
        get("shutdown_c", lambda: float(nv.nvmlDeviceGetTemperatureThreshold(h, nv.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)))
        get("utilization_ratio", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)
        get("power_watts", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
        get("power_limit_watts", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
        get("sm_clock_hz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM) * 1e6)
        get("memory_clock_hz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM) * 1e6)
        get("throttle_reasons", lambda: int(nv.nvmlDeviceGetCurrentClocksEventReasons(h)))
        get("pcie_replay_total", lambda: int(nv.nvmlDeviceGetPcieReplayCounter(h)))
        get("ecc_uncorrected_total", lambda: int(nv.nvmlDeviceGetTotalEccErrors(
            h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)))
        return out


THROTTLE_BITS = {  # NVML clocks-event reasons
    "gpu_idle": 0x1, "applications_clocks_setting": 0x2, "sw_power_cap": 0x4, "hw_slowdown": 0x8,
    "sync_boost": 0x10, "sw_thermal_slowdown": 0x20, "hw_thermal_slowdown": 0x40, "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
}


class Watchdog:
    def __init__(self, run_id: str, phase: str, thresholds: Thresholds | None = None, *,
                 gpu_source: GpuSource | None = None, on_alert: Callable[[dict], None] | None = None,
                 pause: Callable[[str], bool] | None = None, resume: Callable[[str], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.run_id, self.phase = run_id, phase
        self.t = thresholds or Thresholds()
        self.gpu = gpu_source
        self.on_alert = on_alert
        self._pause, self._resume = pause, resume
        self.clock = clock
        self.active: dict[str, bool] = {}
        self.fired: list[dict] = []
        self.tps: list[float] = []
        self.low_tps = 0
        self.high_gn = self.low_gn = 0
        self.last_step_at = clock()
        self.last_step = -1
        self.training = False
        self.in_step = False  # the stall clock runs only between a step's begin and its end
        self.thermal_paused = False
        self.last_gpu: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- alerts --------------------------------------------------------------------------------

    def _set(self, rule: str, holds: bool, message: str, value=None, threshold=None,
             step: int | None = None) -> dict | None:
        severity = RULES[rule]
        with self._lock:
            was = self.active.get(rule, False)
            self.active[rule] = holds
            if not holds or was:
                return None
            alert = {"rule": rule, "severity": severity, "message": message, "value": value, "threshold": threshold,
                     "step": step if step is not None else self.last_step, "run_id": self.run_id, "phase": self.phase,
                     "time": time.time()}
            self.fired.append(alert)
        log.warning("duet alert %s (%s) run %s: %s", rule, severity, self.run_id, message)
        if self.on_alert:
            self.on_alert(alert)
        if self.t.webhook_url:
            threading.Thread(target=_post, args=(self.t.webhook_url, alert), daemon=True).start()
        return alert

    # -- inputs ---------------------------------------------------------------------------------

    def observe_log(self, step: int, loss: float | None, grad_norm: float | None) -> list[dict]:
        out = []
        if loss is not None:
            bad = not math.isfinite(loss)
            a = self._set("loss_nan", bad, f"loss is {loss} at step {step}", loss, None, step)
            out += [a] if a else []
        if grad_norm is not None and math.isfinite(grad_norm):
            self.high_gn = self.high_gn + 1 if grad_norm > self.t.grad_norm_high else 0
            self.low_gn = self.low_gn + 1 if grad_norm < self.t.grad_norm_low else 0
            n = self.t.grad_norm_patience
            a = self._set("grad_norm_high", self.high_gn >= n,
                          f"gradient norm {grad_norm:.3g} > {self.t.grad_norm_high} for {self.high_gn} steps",
                          grad_norm, self.t.grad_norm_high, step)
            b = self._set("grad_norm_vanishing", self.low_gn >= n,
                          f"gradient norm {grad_norm:.3g} < {self.t.grad_norm_low} for {self.low_gn} steps",
                          grad_norm, self.t.grad_norm_low, step)
            out += [x for x in (a, b) if x]
        return out

    def step_started(self) -> None:
        """A training step begins: the stall clock starts (it stops at ``observe_step``)."""
        self.last_step_at = self.clock()
        self.in_step = True

    def observe_step(self, step: int, tokens_per_second: float | None = None) -> list[dict]:
        self.last_step, self.last_step_at = step, self.clock()
        self.in_step = False
        out = []
        a = self._set("training_stalled", False, "")
        if tokens_per_second is None or tokens_per_second <= 0:
            return out
        self.tps.append(tokens_per_second)
        warm, base_n = self.t.throughput_warmup, self.t.throughput_baseline
        if len(self.tps) <= warm + base_n:
            return out
        baseline = statistics.median(self.tps[warm:warm + base_n])
        low = tokens_per_second < self.t.throughput_drop * baseline
        self.low_tps = self.low_tps + 1 if low else 0
        a = self._set("throughput_drop", self.low_tps >= self.t.throughput_patience,
                      f"{tokens_per_second:.0f} tokens/s is below {self.t.throughput_drop:.0%} of the run's baseline "
                      f"{baseline:.0f} for {self.low_tps} steps", tokens_per_second, self.t.throughput_drop * baseline, step)
        return out + ([a] if a else [])

    def temperature_limit(self, gpu: dict) -> float:
        lim = self.t.temperature_c
        if gpu.get("slowdown_c"):
            lim = min(lim, gpu["slowdown_c"] - self.t.slowdown_margin_c)
        return lim

    def tick(self) -> list[dict]:
        """One evaluation of the time-based rules (the thread calls this every ``interval_s``)."""
        out = []
        gpu = None
        if self.gpu is not None:
            try:
                gpu = self.gpu.read()
            except Exception as exc:
                log.warning("GPU read failed: %s", exc)
        self.last_gpu = gpu
        if gpu and gpu.get("memory_total_bytes") and gpu.get("process_memory_bytes") is not None:
            total = gpu["memory_total_bytes"]
            frac = gpu["process_memory_bytes"] / total
            card = (f"; the card: {gpu['memory_used_bytes'] / total:.0%} used by every process"
                    if gpu.get("memory_used_bytes") is not None else "")
            a = self._set("gpu_memory_high", frac > self.t.vram_fraction,
                          f"duet's training holds {frac:.0%} of GPU memory (> {self.t.vram_fraction:.0%}; plans keep "
                          f"under {USABLE_FRACTION:.0%}, so this run has grown past its plan){card}", round(frac, 4),
                          self.t.vram_fraction)
            out += [a] if a else []
        if gpu and gpu.get("temperature_c") is not None:
            temp, lim = gpu["temperature_c"], self.temperature_limit(gpu)
            a = self._set("gpu_temperature_high", temp > lim, f"GPU at {temp:.0f} C (> {lim:.0f} C)", temp, lim)
            out += [a] if a else []
            if self.t.thermal_pause and temp > lim and not self.thermal_paused and self.training and self._pause:
                if self._pause(f"thermal: {temp:.0f} C > {lim:.0f} C"):
                    self.thermal_paused = True
            elif self.thermal_paused and temp < self.t.resume_below_c and self._resume:
                if self._resume(f"thermal: back to {temp:.0f} C (< {self.t.resume_below_c:.0f} C)"):
                    self.thermal_paused = False
        if self.training and self.in_step and not self.thermal_paused:
            idle = self.clock() - self.last_step_at
            a = self._set("training_stalled", idle > self.t.stall_seconds,
                          f"step {self.last_step + 1} has run for {idle:.0f} s (> {self.t.stall_seconds:.0f} s)",
                          round(idle, 1), self.t.stall_seconds)
            out += [a] if a else []
        return out

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        self.training = True
        self.in_step = False
        self.last_step_at = self.clock()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"duet-watchdog-{self.run_id}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.t.interval_s):
            try:
                self.tick()
            except Exception as exc:  # the watchdog must never take the run down
                log.warning("watchdog tick failed: %s", exc)

    def stop(self) -> None:
        self.training = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def describe(self) -> dict:
        return {"thresholds": asdict(self.t), "gpu": self.last_gpu, "active": [k for k, v in self.active.items() if v],
                "fired": len(self.fired), "thermal_paused": self.thermal_paused}


def _post(url: str, alert: dict) -> None:
    body = json.dumps({"source": "duet-watchdog", "alerts": [alert]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=3).read()
    except Exception as exc:
        log.warning("alert webhook %s failed: %s", url, exc)
