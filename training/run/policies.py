"""The engine's recovery policies, as plain functions and classes (no torch, no trainer):

- out of memory: ``oom_replan`` halves the micro-batch (doubling accumulation: the same effective
  batch), then turns gradient checkpointing on, then halves the eval batch; None when nothing is
  left, and the run gives up;
- bad gradients: ``GradientGuard`` raises ``BadGradients`` on a non-finite loss or grad norm, or a
  norm above ``grad_norm_limit`` for ``grad_norm_patience`` logged steps; the engine rolls back to
  the newest valid checkpoint and scales the learning rate by ``rollback_lr_factor``;
- ``max_recoveries`` OOM re-plans and rollbacks together, then ``GaveUp``.

The watchdog (training/run/watchdog.py) only alerts on the same signals; acting on them is here.
"""

from __future__ import annotations

import errno
import math

from training.config import TrainConfig


class RunCancelled(Exception):
    pass


class BadGradients(Exception):
    """NaN/inf loss or exploding gradients: roll back to the newest valid checkpoint."""


class GaveUp(RuntimeError):
    """The recovery policy is exhausted."""


# what the allocators say when they cannot: CUDA's caching allocator raises torch.OutOfMemoryError, but
# torch's CPU allocator a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), a kernel
# launch "CUDA error: out of memory", and Python itself MemoryError
OOM_WORDS = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", "CUDA error: out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (on any device), which the OOM policy re-plans."""
    return (type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError)
            or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)  # a native library's mmap or malloc
            or (isinstance(exc, RuntimeError) and any(w in str(exc) for w in OOM_WORDS)))


OOM_KNOBS = ("micro_batch", "grad_accum", "gradient_checkpointing", "seq_len", "eval_batch")


def oom_replan(cfg: TrainConfig) -> tuple[TrainConfig, dict] | None:
    """The next configuration to try after an OOM and what changed, or None when nothing is left."""
    eval_batch = cfg.eval_batch or cfg.micro_batch
    if cfg.micro_batch > 1:
        change = {"micro_batch": cfg.micro_batch // 2, "grad_accum": cfg.grad_accum * 2}
    elif not cfg.gradient_checkpointing:
        change = {"gradient_checkpointing": True}
    elif eval_batch > 1:
        change = {"eval_batch": max(1, eval_batch // 2)}
    else:
        return None
    return cfg.model_copy(update=change), change


def exhausted(cfg: TrainConfig, recoveries: list) -> bool:
    return len(recoveries) > cfg.max_recoveries


class GradientGuard:
    """Watches each logged step's loss and gradient norm; raises BadGradients when the run must roll back."""

    def __init__(self, cfg: TrainConfig):
        self.limit = cfg.grad_norm_limit
        self.patience = cfg.grad_norm_patience
        self.exploding = 0

    def observe(self, step: int, loss: float, grad_norm: float | None) -> None:
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise BadGradients(f"non-finite loss/grad norm at step {step} (loss {loss}, grad norm {grad_norm})")
        self.exploding = self.exploding + 1 if grad_norm is not None and grad_norm > self.limit else 0
        if self.exploding >= self.patience:
            raise BadGradients(f"gradient norm above {self.limit} for {self.exploding} steps (last {grad_norm:.3g})")


def recover(run, kind: str, *, step: int, message: str, **extra) -> str | None:
    """The one recovery policy, for a run in one process (training/run/engine.py) and for a data-parallel
    group (training/run/rank.py, rank 0 between attempts): what ended the attempt (``kind``: ``oom``,
    ``rollback``, ``worker_restart``) is recorded as a recovery, an OOM re-plans ``run.train_cfg``, bad
    gradients scale ``run.lr_scale``. Returns why the run gives up, or None to go on from the newest
    valid checkpoint."""
    from training.run import telemetry

    m = telemetry.metrics()
    give_up = None
    if kind == "oom":
        m["ooms"].labels(run.run_id, run.phase).inc()
        replan = oom_replan(run.train_cfg)
        entry = {"kind": "oom", "step": step, "message": message[:300], **extra, "change": replan and replan[1]}
        if replan is None:
            where = f" on rank {extra['rank']}" if extra.get("rank") is not None else ""
            give_up = (f"out of memory{where} at step {step} and the OOM policy is exhausted (micro-batch 1, "
                       f"gradient checkpointing on, eval batch 1): {message}")
        else:
            run.train_cfg = replan[0]
        entry["train"] = {k: getattr(run.train_cfg, k) for k in OOM_KNOBS}
    elif kind == "rollback":
        m["rollbacks"].labels(run.run_id, run.phase).inc()
        run.lr_scale *= run.train_cfg.rollback_lr_factor
        entry = {"kind": "rollback", "step": step, "reason": message, **extra, "lr_scale": run.lr_scale}
    else:
        entry = {"kind": kind, "step": step, "message": message, **extra}
    run.recoveries.append(entry)
    run.emit(entry["kind"], **entry)
    if give_up is None and exhausted(run.train_cfg, run.recoveries):
        give_up = f"{len(run.recoveries)} recoveries: giving up ({entry})"
    if give_up is None:
        m["recoveries"].labels(run.run_id, run.phase).inc()
    return give_up
