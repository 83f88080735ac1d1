"""The engine's recovery policies, as plain functions and classes (no torch, no trainer):

- out of memory: ``oom_replan`` halves the micro-batch (doubling accumulation: the same effective
  batch), then turns gradient checkpointing on, then halves the eval batch; None when nothing is
  left, and the run gives up;
- bad gradients: ``GradientGuard`` raises ``BadGradients`` on a non-finite loss or grad norm, or a
  norm above ``grad_norm_limit`` for ``grad_norm_patience`` logged steps; the engine rolls back to
  the newest valid checkpoint and scales the learning rate by ``rollback_lr_factor``;
- ``max_recoveries`` OOM re-plans and rollbacks together, then ``GaveUp``.

The watchdog (training/watchdog.py) only alerts on the same signals; acting on them is here.
"""

from __future__ import annotations

import math

from training.config import TrainConfig


class RunCancelled(Exception):
    pass


class BadGradients(Exception):
    """NaN/inf loss or exploding gradients: roll back to the newest valid checkpoint."""


class GaveUp(RuntimeError):
    """The recovery policy is exhausted."""


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
