"""The engine's hands inside the Trainer, each a documented ``TrainerCallback``:

- ``CheckpointCommit``: the Trainer saves each checkpoint under ``<run>/checkpoints/.staging``
  (its ``output_dir``); on ``on_save`` the checkpoint is validated, given its manifest and renamed
  into ``<run>/checkpoints`` (training/run/checkpoints.py), and the oldest beyond ``keep`` are removed;
- ``Progress``: the run's progress, losses.jsonl, eval losses, Prometheus metrics and the
  watchdog's step clock;
- ``RollbackGuard``: the bad-gradient policy (training/run/policies.py) and the learning-rate scale
  after a rollback;
- ``FaultInjection``: ``DUET_FAULT`` (tests and drills: oom, nan, kill at a step);
- ``PauseControl``: cancel stops after the step; pause saves a checkpoint and waits for resume.

Imports transformers: only the engine imports this module, inside a run.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from training.run import checkpoints, telemetry
from training.run.policies import GradientGuard
from infra import malloc
from infra.lazy import lazy
from infra.run_states import RunState

torch = lazy("torch", extra="executor")


class CheckpointCommit(TrainerCallback):
    """Commit what the Trainer staged: validate, manifest, rename, rotate. Added before ``Progress``
    and ``PauseControl`` so that they see the committed checkpoint."""

    def __init__(self, run, keep: int):
        self.run, self.keep = run, keep

    def on_save(self, args, state, control, **kw):
        staging, final_root = Path(args.output_dir), self.run.checkpoint_root
        for staged in checkpoints.listing(staging):
            checkpoints.commit(staged, final_root)
        shutil.rmtree(staging, ignore_errors=True)
        checkpoints.rotate(final_root, self.keep)
        ckpt = final_root / f"checkpoint-{state.global_step}"
        ok = checkpoints.is_valid(ckpt)
        run = self.run
        run.checkpoints = [c for c in run.checkpoints if c["step"] != state.global_step] + \
            [{"step": state.global_step, "path": str(ckpt), "valid": ok}]
        telemetry.metrics()["checkpoints"].labels(run.run_id, run.phase).inc()
        run.emit("checkpoint", step=state.global_step, path=str(ckpt), valid=ok)
        run.write_record()


TRIM_EVERY = 100
KEEP_LOG_HISTORY = 500  # the trainer's own log_history entries kept in memory (and in trainer_state.json)
PLOT_EVERY = 500  # loss.png redrawn (every 50 steps before that); each redraw left ~1 MB of heap behind on a
                  # training thread, so a 20,000-step run grew by hundreds of MB. The live charts are the dashboard's.


class Progress(TrainerCallback):
    """Progress, losses and metrics of each step; the watchdog's observations."""

    def __init__(self, run):
        self.run = run
        self.m = telemetry.metrics()
        self.lab = (run.run_id, run.phase)
        self.t_last = self.t_start = None
        self.tokens_last = 0
        self.start_step = 0

    def on_train_begin(self, args, state, control, **kw):
        malloc.tame()
        self.t_start = self.t_last = time.time()
        self.tokens_last = int(state.num_input_tokens_seen or 0)
        self.start_step = state.global_step
        self.m["max_steps"].labels(*self.lab).set(state.max_steps)

    def on_step_begin(self, args, state, control, **kw):
        if self.run.watchdog is not None:
            self.run.watchdog.step_started()

    def on_step_end(self, args, state, control, **kw):
        run, p = self.run, self.run.progress
        now = time.time()
        tokens = int(state.num_input_tokens_seen or 0)
        dt, dtok = now - (self.t_last or now), tokens - self.tokens_last
        tps = dtok / dt if dt > 0 and dtok > 0 else None
        if tps is not None:
            p["tokens_per_second"] = round(tps, 1)
            self.m["tokens_per_second"].labels(*self.lab).set(tps)
            self.m["tokens"].labels(*self.lab).inc(dtok)
        self.m["samples"].labels(*self.lab).inc(args.per_device_train_batch_size * args.gradient_accumulation_steps)
        self.t_last, self.tokens_last = now, tokens
        if run.watchdog is not None:
            run.watchdog.observe_step(state.global_step, tps)
        p["step"] = state.global_step
        done = state.global_step - self.start_step
        if done > 0:
            p["eta_s"] = round((now - self.t_start) / done * (state.max_steps - state.global_step), 1)
        self.m["step"].labels(*self.lab).set(state.global_step)
        self.m["epoch"].labels(*self.lab).set(state.epoch or 0)
        if state.global_step % PLOT_EVERY == 0 or (state.global_step < PLOT_EVERY and state.global_step % 50 == 0):
            from training.run.report import write_loss_plot

            write_loss_plot(run.dir / "loss.png", run.all_losses(), run.eval_losses, run.run_id)
        if state.global_step % TRIM_EVERY == 0:  # freed heap pages back to the system (infra/malloc.py)
            malloc.trim()
        telemetry.sample_host()

    def on_log(self, args, state, control, logs=None, **kw):
        logs, run, p, step = logs or {}, self.run, self.run.progress, state.global_step
        if "loss" in logs:
            loss = float(logs["loss"])
            entry = {"step": step, "loss": loss, "time": round(time.time(), 3), "pid": os.getpid(),
                     "tokens": int(state.num_input_tokens_seen or 0)}  # non-padding tokens seen so far
            for key, name in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
                if logs.get(key) is not None:
                    entry[key] = float(logs[key])
                    self.m[name].labels(*self.lab).set(float(logs[key]))
                    p[key] = float(logs[key])
            entry.update(step_telemetry(run))
            run.log_loss(entry)
            p["loss"] = loss
            self.m["loss"].labels(*self.lab).set(loss)
            if run.watchdog is not None:  # alerts: loss_nan, grad_norm_high, grad_norm_vanishing
                run.watchdog.observe_log(step, loss, entry.get("grad_norm"))
        if "eval_loss" in logs and step > 0:
            ev = float(logs["eval_loss"])
            run.eval_losses = [x for x in run.eval_losses if x["step"] != step] + [{"step": step, "eval_loss": ev}]
            p["eval_loss"] = ev
            self.m["eval_loss"].labels(*self.lab).set(ev)
            run.emit("eval", which=f"step {step}", step=step, eval_loss=ev)
        if len(state.log_history) > 2 * KEEP_LOG_HISTORY:  # transformers keeps every log; losses.jsonl has them
            del state.log_history[:-KEEP_LOG_HISTORY]


def step_telemetry(run) -> dict:
    """What a logged step carries besides its loss, for the dashboard's charts: tokens/s, the process
    RSS, and the GPU's memory, temperature and active throttle reasons when the watchdog reads a GPU."""
    import psutil

    from training.run.watchdog import THROTTLE_BITS

    out = {"rss_bytes": psutil.Process().memory_info().rss}
    if run.progress.get("tokens_per_second") is not None:
        out["tokens_per_second"] = run.progress["tokens_per_second"]
    gpu = run.watchdog.last_gpu if run.watchdog is not None else None
    if gpu:
        for key, name in (("process_memory_bytes", "gpu_process_memory_bytes"), ("memory_used_bytes", "gpu_memory_used_bytes"),
                          ("memory_total_bytes", "gpu_memory_total_bytes"),
                          ("temperature_c", "gpu_temperature_c")):
            if gpu.get(key) is not None:
                out[name] = gpu[key]
        if gpu.get("throttle_reasons") is not None:
            out["gpu_throttle"] = [r for r, bit in THROTTLE_BITS.items() if gpu["throttle_reasons"] & bit and r != "gpu_idle"]
    return out


class RollbackGuard(TrainerCallback):
    """The engine's bad-gradient policy (not the watchdog's alerts): BadGradients out of train()."""

    def __init__(self, run):
        self.run = run
        self.guard = GradientGuard(run.train_cfg)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
        scale = self.run.lr_scale
        if scale != 1.0 and optimizer is not None:
            # A rollback restored the optimizer and scheduler: scale the LR from here on.
            for g in optimizer.param_groups:
                g["lr"] *= scale
            if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs = [b * scale for b in lr_scheduler.base_lrs]

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs:
            gn = logs.get("grad_norm")
            self.guard.observe(state.global_step, float(logs["loss"]), None if gn is None else float(gn))


FAULTS = ("oom", "memcap", "nan", "kill")


def parse_faults(text: str | None) -> dict[str, int]:
    """``"oom@step=7,kill@step=12"`` -> {"oom": 7, "kill": 12}."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            kind, cond = part.split("@", 1)
            key, val = cond.split("=", 1)
            if key != "step" or kind not in FAULTS:
                raise ValueError
            out[kind] = int(val)
        except ValueError as exc:
            raise ValueError(f"DUET_FAULT {part!r}: use {'|'.join(FAULTS)}@step=N") from exc
    return out


class FaultInjection(TrainerCallback):
    """``DUET_FAULT``: a torch.OutOfMemoryError raised as step N starts (oom); a real memory limit from
    step N on, so that the step's own allocations fail (memcap, training/run/memory_cap.py); NaN
    embeddings in step N (nan); SIGKILL of this process right after step N's loss is logged (kill).
    Once per run."""

    def __init__(self, run, faults: dict[str, int]):
        self.run, self.faults, self.hook = run, faults, None

    def _fire(self, kind: str, step: int) -> bool:
        run = self.run
        if self.faults.get(kind) == step and kind not in run.faults_fired:
            run.faults_fired.append(kind)
            run.write_record()
            run.emit("fault_injected", fault=kind, step=step)
            return True
        return False

    def on_step_begin(self, args, state, control, model=None, **kw):
        step = state.global_step + 1
        if self._fire("oom", step):
            raise torch.OutOfMemoryError(f"DUET_FAULT: simulated out of memory at step {step}")
        if self.faults.get("memcap") == step and "memcap" not in self.run.faults_fired:
            from training.run import memory_cap

            self._fire("memcap", step)
            self.run.emit("memory_capped", step=step, **memory_cap.apply(self.run.device))
        if model is not None and self._fire("nan", step):
            def to_nan(_module, _inputs, output):
                return output * float("nan")  # NaN embeddings: every loss path downstream is NaN

            self.hook = model.get_input_embeddings().register_forward_hook(to_nan)

    def on_step_end(self, args, state, control, **kw):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def on_log(self, args, state, control, logs=None, **kw):
        if "loss" in (logs or {}) and self._fire("kill", state.global_step):
            os.kill(os.getpid(), signal.SIGKILL)  # a crash right after step N's loss is logged


class PauseControl(TrainerCallback):
    """Cancel: stop after this step. Pause: save a checkpoint after this step, then wait for resume
    (the watchdog's stall clock stops while paused)."""

    def __init__(self, run):
        self.run = run

    def on_step_end(self, args, state, control, **kw):
        if self.run.cancel_requested():
            control.should_training_stop = True
        if self.run.pause_requested():
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        run = self.run
        if not run.pause_requested():
            return
        run.set_state(RunState.PAUSED)
        if run.watchdog is not None:
            run.watchdog.training = False  # paused is not stalled
        run.wait_for_resume()
        if not run.cancel_requested():
            run.set_state(RunState.TRAINING)
        if run.watchdog is not None:
            run.watchdog.training = True
            run.watchdog.last_step_at = run.watchdog.clock()


def for_run(run) -> list[TrainerCallback]:
    """The callbacks of a training attempt, in the order they must run (faults from ``DUET_FAULT``)."""
    faults = parse_faults(os.environ.get("DUET_FAULT"))
    return [CheckpointCommit(run, keep=run.train_cfg.keep_checkpoints), Progress(run), RollbackGuard(run),
            FaultInjection(run, faults), PauseControl(run)]
