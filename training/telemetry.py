"""Prometheus metrics of the executor (prometheus-client), served on a loopback port.

Names follow Prometheus conventions (``duet_`` prefix, base units, ``_total`` for counters).
Training metrics carry ``run_id`` and ``phase`` labels. GPU metrics are absent on a machine
without a GPU (never zero, never invented).
"""

from __future__ import annotations

import threading

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
                "rss": Gauge("duet_process_resident_memory_bytes", "Resident memory of the executor process."),
                "rss_peak": Gauge("duet_process_resident_memory_peak_bytes", "Peak resident memory of the executor process."),
                "cuda_allocated_peak": Gauge("duet_torch_cuda_max_allocated_bytes", "torch.cuda.max_memory_allocated()."),
                "cuda_reserved_peak": Gauge("duet_torch_cuda_max_reserved_bytes", "torch.cuda.max_memory_reserved()."),
            }
        return _metrics


RUN_STATES = ("queued", "preflight", "training", "evaluating", "merging", "reporting", "finished", "failed",
              "cancelled")


def set_state(run_id: str, phase: str, state: str) -> None:
    m = metrics()["state"]
    for s in RUN_STATES:
        m.labels(run_id, phase, s).set(1 if s == state else 0)


def sample_host() -> None:
    import resource

    import psutil

    m = metrics()
    m["rss"].set(psutil.Process().memory_info().rss)
    m["rss_peak"].set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    try:
        import torch

        if torch.cuda.is_available():
            m["cuda_allocated_peak"].set(torch.cuda.max_memory_allocated())
            m["cuda_reserved_peak"].set(torch.cuda.max_memory_reserved())
    except ImportError:
        pass


def serve(port: int, addr: str = "127.0.0.1") -> int:
    """Start the exporter once per process; returns the port it serves on."""
    with _lock:
        if "port" in _server:
            return _server["port"]
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=addr)
        _server.update(port=server.server_address[1], addr=addr, server=server)
        return _server["port"]
