"""Prometheus metrics of the executor (prometheus-client), served on a loopback port.

Names follow Prometheus conventions (``duet_`` prefix, base units, ``_total`` for counters).
Training metrics carry ``run_id`` and ``phase`` labels. GPU metrics are absent on a machine
without a GPU (never zero, never invented).
"""

from __future__ import annotations

import threading

from infra.run_states import RunState

_lock = threading.Lock()
_metrics: dict | None = None
_server: dict = {}


def metrics() -> dict:
    """The process-wide metric objects (created once)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Gauge

            lab = ["run_id", "phase"]
            _metrics = {
                "step": Gauge("duet_train_step", "Optimizer steps completed.", lab),
                "max_steps": Gauge("duet_train_max_steps", "Optimizer steps planned.", lab),
                "epoch": Gauge("duet_train_epoch", "Fractional epoch.", lab),
                "loss": Gauge("duet_train_loss", "Training loss at the last logged step.", lab),
                "eval_loss": Gauge("duet_eval_loss", "Held-out loss at the last evaluation.", lab),
                "lr": Gauge("duet_train_learning_rate", "Learning rate at the last logged step.", lab),
                "grad_norm": Gauge("duet_train_grad_norm", "Gradient norm at the last logged step.", lab),
                "tokens_per_second": Gauge("duet_train_tokens_per_second", "Training throughput.", lab),
                "tokens": Counter("duet_train_tokens", "Training tokens processed.", lab),
                "samples": Counter("duet_train_samples", "Training sequences processed.", lab),
                "checkpoint_seconds": Gauge("duet_checkpoint_duration_seconds", "Time to write the last checkpoint.", lab),
                "checkpoints": Counter("duet_checkpoints", "Checkpoints written.", lab),
                "ooms": Counter("duet_oom_events", "Out-of-memory errors caught.", lab),
                "recoveries": Counter("duet_recoveries", "Recoveries after a fault.", lab),
                "rollbacks": Counter("duet_rollbacks", "Rollbacks to an earlier checkpoint.", lab),
                "state": Gauge("duet_run_state", "1 for the run's current state, 0 otherwise.", lab + ["state"]),
                "alerts": Counter("duet_alerts", "Alerts the executor's watchdog fired.", lab + ["rule", "severity"]),
                "worker_tokens_per_second": Gauge("duet_worker_tokens_per_second", "A data-parallel worker's own "
                                                  "training tokens/s (duet_train_tokens_per_second is their sum).",
                                                  lab + ["rank"]),
                "worker_step_seconds": Gauge("duet_worker_step_seconds", "A data-parallel worker's last step time.",
                                             lab + ["rank"]),
                "worker_memory_bytes": Gauge("duet_worker_memory_bytes", "A data-parallel worker's memory: "
                                             "torch.cuda.memory_allocated() on a GPU, its RSS on CPU.", lab + ["rank"]),
                "cpu": Gauge("duet_process_cpu_seconds", "CPU time of the executor process (user + system)."),
                "rss": Gauge("duet_process_resident_memory_bytes", "Resident memory of the executor process."),
                "rss_peak": Gauge("duet_process_resident_memory_peak_bytes", "Peak resident memory of the executor process."),
                "cuda_allocated_peak": Gauge("duet_torch_cuda_max_allocated_bytes", "torch.cuda.max_memory_allocated()."),
                "cuda_reserved_peak": Gauge("duet_torch_cuda_max_reserved_bytes", "torch.cuda.max_memory_reserved()."),
            }
        return _metrics


RUN_STATES = tuple(s.value for s in RunState if s is not RunState.RUNNING)  # an executor's states


def set_state(run_id: str, phase: str, state: str) -> None:
    m = metrics()["state"]
    for s in RUN_STATES:
        m.labels(run_id, phase, s).set(1 if s == state else 0)


def host_readings() -> dict:
    """This process's CPU time, resident memory and its peak, and torch's CUDA peaks where CUDA runs
    (keys: the metric names below)."""
    import resource
    import sys

    import psutil

    proc = psutil.Process()
    ct = proc.cpu_times()
    out = {"rss": proc.memory_info().rss, "cpu": ct.user + ct.system,
           "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")  # never imported here for a reading
    if torch is not None and torch.cuda.is_available():
        out.update(cuda_allocated_peak=torch.cuda.max_memory_allocated(), cuda_reserved_peak=torch.cuda.max_memory_reserved())
    return out


def sample_host(readings: dict | None = None) -> None:
    """Publish this process's readings (or ``readings``: a run's own process's, training/run/solo.py)."""
    m = metrics()
    for key, value in (readings if readings is not None else host_readings()).items():
        if key in m and value is not None:
            m[key].set(value)


def start_run_series(run_id: str, phase: str) -> None:
    """A run's alert and recovery counters at 0 from its start, so that Prometheus' increase() sees the
    first alert (the process that serves the run's metrics calls it)."""
    from training.run.watchdog import RULES

    m = metrics()
    for rule, severity in RULES.items():
        m["alerts"].labels(run_id, phase, rule, severity)
    for name in ("ooms", "rollbacks", "recoveries", "checkpoints"):
        m[name].labels(run_id, phase)


class GpuCollector:
    """GPU metrics read from a GpuSource (NVML) at scrape time. Registered only when a GPU answers,
    so a machine without one exposes no GPU series at all."""

    def __init__(self, source):
        self.source = source

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from training.run.watchdog import THROTTLE_BITS

        try:
            g = self.source.read()
        except Exception:
            return
        if not g:
            return
        lab = ["gpu", "name"]
        val = [str(g.get("index", 0)), g.get("name", "")]
        gauges = [("process_memory_bytes", "duet_gpu_process_memory_bytes",
                   "GPU memory held by duet's training processes (NVML per process, else torch reserved)."),
                  ("memory_used_bytes", "duet_gpu_memory_used_bytes", "GPU memory in use by every process on the card."),
                  ("memory_total_bytes", "duet_gpu_memory_total_bytes", "GPU memory in total."),
                  ("utilization_ratio", "duet_gpu_utilization_ratio", "GPU busy fraction (0-1)."),
                  ("temperature_c", "duet_gpu_temperature_celsius", "GPU temperature."),
                  ("slowdown_c", "duet_gpu_slowdown_temperature_celsius", "Temperature where the GPU slows down."),
                  ("shutdown_c", "duet_gpu_shutdown_temperature_celsius", "Temperature where the GPU shuts down."),
                  ("power_watts", "duet_gpu_power_watts", "GPU power draw."),
                  ("power_limit_watts", "duet_gpu_power_limit_watts", "Enforced GPU power limit."),
                  ("sm_clock_hz", "duet_gpu_sm_clock_hertz", "SM clock."),
                  ("memory_clock_hz", "duet_gpu_memory_clock_hertz", "Memory clock.")]
        for key, name, help_ in gauges:
            if g.get(key) is not None:
                f = GaugeMetricFamily(name, help_, labels=lab)
                f.add_metric(val, float(g[key]))
                yield f
        if g.get("throttle_reasons") is not None:
            f = GaugeMetricFamily("duet_gpu_throttle_reason", "1 when this clocks-event (throttle) reason is active.",
                                  labels=lab + ["reason"])
            for reason, bit in THROTTLE_BITS.items():
                f.add_metric(val + [reason], 1.0 if g["throttle_reasons"] & bit else 0.0)
            yield f
        for key, name, help_ in (("pcie_replay_total", "duet_gpu_pcie_replays", "PCIe replay counter."),
                                 ("ecc_uncorrected_total", "duet_gpu_ecc_uncorrected_errors", "Uncorrected ECC errors (volatile).")):
            if g.get(key) is not None:
                f = CounterMetricFamily(name, help_, labels=lab)
                f.add_metric(val, float(g[key]))
                yield f


def register_once(key: str, make) -> None:
    """Register a custom collector (``make()``) with the process's registry once per ``key``."""
    with _lock:
        done = _server.setdefault("collectors", set())
        if key in done:
            return
        from prometheus_client import REGISTRY

        REGISTRY.register(make())
        done.add(key)


def serve(port: int, addr: str = "127.0.0.1", gpu_source="detect") -> int:
    """Start the exporter once per process; returns the port it serves on. ``gpu_source``: "detect"
    (NVML when a GPU answers), None, or a GpuSource."""
    with _lock:
        if "port" in _server:
            return _server["port"]
        from prometheus_client import REGISTRY, start_http_server

        if gpu_source == "detect":
            from training.run.watchdog import NvmlSource

            gpu_source = NvmlSource.detect()
        if gpu_source is not None:
            REGISTRY.register(GpuCollector(gpu_source))
        server, _thread = start_http_server(port, addr=addr)
        _server.update(port=server.server_address[1], addr=addr, server=server, gpu=gpu_source is not None)
        return _server["port"]
