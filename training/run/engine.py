"""The run engine: pre-flight, dry run, LoRA/QLoRA SFT and DPO on TRL + PEFT, atomic checkpoints,
deterministic resume, OOM and bad-gradient policies, eval, merge, report.

A plain class (no Ray): the ExecutorActor runs ``Run.execute()`` in the main thread of a process of
the run's own (training/run/solo.py) and follows it through the run dir; ``duet train`` runs it in the
foreground. Everything a run produces lives under its run dir::

    <data_dir>/runs/<run_id>/
        spec.json  dataset/                      what was submitted (dataset files re-hashed in pre-flight)
        run.json  report.md  loss.png            the record (small: copied to the workspace)
        events.jsonl  losses.jsonl               append-only logs (a resumed step's last entry wins)
        checkpoints/checkpoint-<step>/           adapter + optimizer + scheduler + RNG + trainer state
        adapter/  merged/                        the final adapter and the merged 16/32-bit model

Invariants: run.json is rewritten atomically; events.jsonl and losses.jsonl are append-only; a
failed pre-flight stops the run before any training; a checkpoint is used only if valid
(training/run/checkpoints.py); every interruption costs at most one checkpoint interval.

Where the rest lives: the checks before training (preflight.py), the model and trainer
(model_load.py), the callbacks inside the Trainer, ``DUET_FAULT`` included (callbacks.py), the OOM
and rollback policies (policies.py), the merge (merge.py), the run's files (run_files.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from pathlib import Path

from training.run import checkpoints, memory_cap, phases, policies, run_files, telemetry
from training.config import TrainConfig, check_run_id
from training.data.dataset import VERSION_FILES
from training.run.model_load import build_trainer, load_datasets, load_train_model, torch_dtype
from training.run.policies import BadGradients, GaveUp, RunCancelled
from training.run.preflight import dry_run, preflight
from infra.lazy import lazy

torch = lazy("torch", extra="executor")

from infra.run_states import TERMINAL, RunState  # noqa: F401  (TERMINAL: training.run.executor reads it here)
LOSS_WINDOW = 2000   # logged steps kept in memory (twice that before trimming); the rest stay in losses.jsonl


def base_path(runs_dir: Path, init_from: str | None, phase: str, model_path: Path) -> Path:
    """The model a run's adapter sits on: SFT chaining trains a new adapter on the previous run's merged
    model; otherwise the model the pre-flight resolved (``model_path``)."""
    if init_from and phase == "sft":
        return Path(runs_dir) / init_from / "merged"
    return Path(model_path)


class Run:
    """One training run. A new run's ``spec`` is what the architect submitted:

    ``{"run_id", "plan": Plan.to_dict(), "model_ref", "dataset": {"name", "content_hash",
    "files": {"train.jsonl": text, "test.jsonl": text, "manifest.json": text}}}``

    ``Run.load(run_dir)`` reopens a run (after a crash, a restart or for ``--resume``).
    """

    def __init__(self, spec: dict, data_dir: str | os.PathLike, hardware: dict, *, _loaded: bool = False):
        self.run_id: str = check_run_id(spec["run_id"])
        unknown = set(spec["dataset"].get("files", {})) - set(VERSION_FILES)
        if unknown:
            raise ValueError(f"run {self.run_id}: unexpected dataset file(s) {sorted(unknown)} "
                             f"(a version holds {', '.join(VERSION_FILES)})")
        self.dir = Path(data_dir) / "runs" / self.run_id
        self.hardware = hardware
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._pause = threading.Event()
        self._resumed = threading.Event()
        self.events: list[dict] = []
        self.state = RunState.QUEUED.value
        self.losses: list[dict] = []   # the newest LOSS_WINDOW..2x entries; all of them: all_losses()
        self._trimmed = False
        self._cut: int | None = None    # the step a resume rolled back to
        self.eval_losses: list[dict] = []
        self.checkpoints: list[dict] = []
        self.recoveries: list[dict] = []
        self.faults_fired: list[str] = []
        self.lr_scale = 1.0
        self.result: dict = {}
        self.error: str | None = None
        self.train_peak = 0
        self.started = time.time()
        self.gpu_source = None  # the watchdog's GPU readings: NVML when a GPU is visible (tests set a fake)
        self.watchdog = None
        self.peaks = None
        self.launcher = None  # data-parallel runs: how the ranks are started (roles/data_parallel.py, via the executor)
        self.torch_threads: int | None = None
        self._pause_reason: str | None = None
        if not _loaded:
            self.dir.mkdir(parents=True, exist_ok=True)
            ds_dir = self.dir / "dataset"
            ds_dir.mkdir(exist_ok=True)
            for name, text in spec["dataset"]["files"].items():
                (ds_dir / name).write_text(text, encoding="utf-8")
            spec = {**spec, "dataset": {k: v for k, v in spec["dataset"].items() if k != "files"}}
            run_files.atomic_json(self.dir / "spec.json", spec)
        self.spec = spec
        self.plan: dict = spec["plan"]
        self.train_cfg: TrainConfig = TrainConfig.model_validate(spec["plan"]["train"])  # typed from here on
        self.device: str = self.plan["device"]
        self.device_index: int | None = None  # a data-parallel rank's GPU (training/run/rank.py); else the current one
        self.dtype: str = self.plan["dtype"]
        self.phase: str = self.train_cfg.phase
        self.progress = {"step": 0, "max_steps": self.train_cfg.max_steps, "loss": None, "eval_loss": None,
                         "learning_rate": None, "grad_norm": None, "tokens_per_second": None, "eta_s": None}
        if not _loaded:
            self.write_record()

    @classmethod
    def load(cls, run_dir: str | os.PathLike, hardware: dict) -> "Run":
        run_dir = Path(run_dir)
        spec = json.loads((run_dir / "spec.json").read_text())
        run = cls(spec, run_dir.parent.parent, hardware, _loaded=True)
        rec = json.loads((run_dir / "run.json").read_text())
        run.state = rec.get("status", "queued")
        run.started = rec.get("started", run.started)
        if rec.get("train_effective"):
            run.train_cfg = TrainConfig.model_validate(rec["train_effective"])
        run.recoveries = rec.get("recoveries", [])
        run.faults_fired = rec.get("faults_fired", [])
        run.lr_scale = rec.get("lr_scale", 1.0)
        run.checkpoints = rec.get("checkpoints", [])
        run.eval_losses = rec.get("eval_losses", [])
        run.error = rec.get("error")
        for key in ("eval_loss_before", "preflight", "model_path", "dry_run", "moves", "moved_to"):
            if key in rec:
                run.result[key] = rec[key]
        run.losses = run_files.read_by_step(run.dir / "losses.jsonl")
        if (run.dir / "events.jsonl").exists():
            run.events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines() if x.strip()]
        return run

    # -- state shared with the actor ------------------------------------------------------------

    def emit(self, _event: str, **payload) -> None:
        """Record a run event: kept in memory (the architect polls them), appended to events.jsonl. A
        non-finite number (a NaN loss's alert) is stored as null: session events are strict JSON."""
        with self._lock:
            ev = {"seq": len(self.events), "time": time.time(), "run_id": self.run_id, "event": _event,
                  **run_files.finite(payload)}
            self.events.append(ev)
        run_files.jsonl_append(self.dir / "events.jsonl", ev)

    def set_state(self, state: str) -> None:
        state = RunState(state).value  # one of the states infra/run_states.py defines, as its plain word
        self.state = state
        telemetry.set_state(self.run_id, self.phase, state)
        self.emit("state", state=state)
        self.write_record()

    def snapshot(self, since: int = 0) -> dict:
        with self._lock:
            return {"run_id": self.run_id, "state": self.state, "progress": dict(self.progress),
                    "events": self.events[since:], "error": self.error, "result": dict(self.result),
                    "recoveries": list(self.recoveries)}

    def append_event(self, ev: dict) -> None:
        """An event that happened elsewhere (a data-parallel rank's), into this run's list."""
        with self._lock:
            self.events.append(ev)

    def cancel(self) -> None:
        self._cancel.set()
        self._resumed.set()

    def pause(self, reason: str = "user") -> None:
        """Finish the current step, checkpoint, wait until ``resume()``."""
        self._pause_reason = reason
        self._resumed.clear()
        self._pause.set()

    def resume(self) -> None:
        self._pause_reason = None
        self._pause.clear()
        self._resumed.set()

    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def wait_for_resume(self) -> None:
        self._resumed.wait()

    @property
    def checkpoint_root(self) -> Path:
        return self.dir / "checkpoints"

    def log_loss(self, entry: dict) -> None:
        """A logged step's loss: a resumed step replaces the entry it repeats (losses.jsonl keeps both;
        the last entry of a step wins when read back)."""
        self.keep_loss(entry)
        run_files.jsonl_append(self.dir / "losses.jsonl", entry)

    def keep_loss(self, entry: dict) -> None:
        """The in-memory half of ``log_loss`` (the executor's copy of a run another process logs)."""
        if self.losses and self.losses[-1]["step"] >= entry["step"]:  # a re-logged step (resume, rollback)
            self.losses = [x for x in self.losses if x["step"] < entry["step"]]
        self.losses.append(entry)
        if len(self.losses) > 2 * LOSS_WINDOW:  # memory stays flat over a long run: the rest is on disk
            with self._lock:
                self.losses = self.losses[-LOSS_WINDOW:]
                self._trimmed = True

    @property
    def trimmed(self) -> bool:
        """Older logged losses than ``losses`` holds exist (on disk only)."""
        return self._trimmed

    def all_losses(self) -> list[dict]:
        """Every logged step's loss: those kept in memory, after the older ones read back from
        losses.jsonl (append-only; the last entry of a step wins; a resume's roll-back honoured)."""
        with self._lock:
            mem, trimmed, cut = list(self.losses), self._trimmed, self._cut
        if not trimmed:
            return mem
        older = run_files.read_by_step(self.dir / "losses.jsonl")
        if mem:
            return [x for x in older if x["step"] < mem[0]["step"]] + mem
        return [x for x in older if cut is None or x["step"] <= cut]

    # -- the watchdog's hands --------------------------------------------------------------------

    def _on_alert(self, alert: dict) -> None:
        self.emit("alert", **{k: v for k, v in alert.items() if k not in ("run_id", "time")})
        telemetry.metrics()["alerts"].labels(self.run_id, self.phase, alert["rule"], alert["severity"]).inc()

    def _thermal_pause(self, why: str) -> bool:
        if self._pause.is_set():  # already paused (by a user): leave it to them
            return False
        self.emit("thermal_pause", reason=why)
        self.pause("thermal")
        return True

    def _thermal_resume(self, why: str) -> bool:
        if self._pause_reason != "thermal":
            return False
        self.emit("thermal_resume", reason=why)
        self.resume()
        return True

    def start_watchdog(self):
        from training.run.watchdog import NvmlSource, Watchdog
        from training.config import Thresholds

        src = self.gpu_source
        if src is None and self.plan.get("device") == "cuda":
            src = NvmlSource.detect()
        telemetry.start_run_series(self.run_id, self.phase)
        self.watchdog = Watchdog(self.run_id, self.phase, Thresholds.from_train(self.train_cfg.model_dump()), gpu_source=src,
                                 on_alert=self._on_alert, pause=self._thermal_pause, resume=self._thermal_resume)
        return self.watchdog.start()

    def record(self) -> dict:
        ds = self.spec["dataset"]
        manifest = json.loads((self.dir / "dataset" / "manifest.json").read_text())
        return {
            "schema_version": 1,
            "run_id": self.run_id,
            "status": self.state,
            "error": self.error,
            "name": self.train_cfg.name,
            "phase": self.phase,
            "started": self.started,
            "dataset": {"name": ds["name"], "content_hash": ds["content_hash"], "counts": manifest.get("counts", {})},
            "config": self.plan,
            "train_effective": self.train_cfg.model_dump(),
            "model": {"ref": self.spec["model_ref"], "init_from": self.train_cfg.init_from},
            "code_sha": run_files.code_sha(),
            "host": self.hardware,
            "placement": self.spec.get("placement"),  # where the scheduler started it (roles/controller.py)
            "checkpoints": self.checkpoints,
            "recoveries": self.recoveries,
            "faults_fired": self.faults_fired,
            "lr_scale": self.lr_scale,
            "losses": self.all_losses(),
            "eval_losses": self.eval_losses,
            **self.result,
        }

    def write_record(self) -> None:
        run_files.atomic_json(self.dir / "run.json", self.record())

    # -- the run ----------------------------------------------------------------------------------

    def execute(self, resume: bool = False) -> None:
        """Run to completion (or continue a run that was interrupted); never raises: the outcome is
        in state / error / run.json."""
        t0 = time.time()
        lock = None
        from training.run.phases import PhasePeaks

        self.peaks = PhasePeaks().start()
        try:
            lock = run_files.acquire_lock(self.dir / ".lock", self.emit, f"run {self.run_id}")
            self.peaks.enter("preflight")
            self.set_state(RunState.PREFLIGHT)
            model_path = preflight(self)
            if not resume and self.train_cfg.dry_run_steps:
                self.set_state(RunState.DRY_RUN)
                dry_run(self, model_path)
            self.set_state(RunState.TRAINING)
            self.start_watchdog()
            self.train(model_path, resume=resume)
            self.watchdog.stop()
            self.set_state(RunState.MERGING)
            self.merge_and_evaluate(model_path)
            self.set_state(RunState.REPORTING)
            self.result["wall_s"] = round(time.time() - t0, 2)
            self.result["peak_memory"] = phases.peak_memory_bytes()
            self.result["phases"] = phases.phase_report(self.peaks, self.plan)
            from training.run.report import write_loss_plot, write_report

            write_loss_plot(self.dir / "loss.png", self.all_losses(), self.eval_losses, self.run_id)
            self.state = RunState.FINISHED.value
            self.write_record()
            write_report(self.dir / "report.md", self.record())
            self.set_state(RunState.FINISHED)
        except RunCancelled:
            self.set_state(RunState.CANCELLED)
        except Exception as exc:  # the outcome is reported, not raised, in the background thread
            self.error = f"{type(exc).__name__}: {exc}"
            self.emit("error", message=self.error, traceback=traceback.format_exc()[-4000:])
            self.set_state(RunState.FAILED)
            try:
                from training.run.report import write_report

                write_report(self.dir / "report.md", self.record())
            except Exception:
                pass
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.peaks.stop()
            telemetry.sample_host()
            if lock is not None:
                lock.close()

    # -- building blocks ----------------------------------------------------------------------------

    def torch_dtype_of_run(self):
        return torch_dtype(self.dtype)

    def base_path(self, model_path: Path) -> Path:
        return base_path(self.dir.parent, self.train_cfg.init_from, self.phase, model_path)

    def load_model(self, model_path: Path, cfg: TrainConfig):
        """Base (4-bit for QLoRA) + LoRA adapter: new, or the init_from run's adapter for DPO."""
        init_from = cfg.init_from
        adapter = self.dir.parent / init_from / "adapter" if init_from and self.phase == "dpo" else None
        return load_train_model(self.base_path(model_path), cfg, device=self.device, dtype=self.dtype, adapter=adapter,
                                device_index=self.device_index)

    def trainer(self, model, tok, cfg: TrainConfig, *, out: Path, max_steps: int, save: bool, evaluate: bool):
        train_ds, test_ds = load_datasets(self.dir / "dataset", self.phase, tok)
        return build_trainer(model, tok, cfg, phase=self.phase, device=self.device, dtype=self.dtype, out=out,
                             max_steps=max_steps, evaluate=evaluate, save=save, train_ds=train_ds, eval_ds=test_ds)

    def train(self, model_path: Path, resume: bool = False) -> None:
        """Train with the recovery policies; ``resume``: continue from the newest valid checkpoint."""
        if self.train_cfg.world_size > 1:  # data parallel: ranks started by the executor's launcher
            from training.run import distributed

            return distributed.train(self, model_path, resume)
        from_ckpt = None
        if resume:
            skipped: list = []
            from_ckpt = checkpoints.newest_valid(self.checkpoint_root, skipped)
            if skipped:
                self.emit("checkpoint_skipped", paths=skipped, reason="invalid or partial (size/hash mismatch)")
            self.emit("resume", checkpoint=str(from_ckpt) if from_ckpt else None)
        try:
            self._attempts(model_path, from_ckpt)
        finally:
            memory_cap.lift()

    def _attempts(self, model_path: Path, from_ckpt: Path | None) -> None:
        ckpt_root = self.checkpoint_root
        while True:
            cfg = self.train_cfg
            phases.release_memory()
            try:
                self._train_once(model_path, cfg, from_ckpt)
                return
            except Exception as exc:  # noqa: BLE001  (the one policy, training/run/policies.py; others go on up)
                oom = policies.out_of_memory(exc)
                memory_cap.lift()  # a memcap fault's limit holds for the attempt it fired in
                if not (oom or isinstance(exc, BadGradients)):
                    raise
                phases.release_memory()
                why = policies.recover(self, "oom" if oom else "rollback", step=self.progress["step"],
                                       message=str(exc) or type(exc).__name__, error=type(exc).__name__)
                if why is not None:
                    raise GaveUp(why) from exc
            skipped = []
            from_ckpt = checkpoints.newest_valid(ckpt_root, skipped)
            self.recoveries[-1]["resumed_from"] = str(from_ckpt) if from_ckpt else "start"
            self.drop_losses_after(checkpoints.step_of(from_ckpt) if from_ckpt else 0)
            self.write_record()

    def drop_losses_after(self, step: int) -> None:
        self.losses = [x for x in self.losses if x["step"] <= step]
        self._cut = step
        self.eval_losses = [x for x in self.eval_losses if x["step"] <= step]
        self.checkpoints = [c for c in self.checkpoints if c["step"] <= step]

    def _train_once(self, model_path: Path, cfg: TrainConfig, from_ckpt: Path | None) -> None:
        """One attempt in this process (training/run/attempt.py; data-parallel ranks run the same)."""
        from training.run import callbacks
        from training.run.attempt import train_attempt

        train_attempt(self, model_path, cfg, from_ckpt, callbacks.for_run(self))

    def enter_phase(self, phase: str) -> None:
        if self.peaks is not None:
            self.peaks.enter(phase)

    def merge_and_evaluate(self, model_path: Path) -> None:
        """Merge, verify and sample (training/run/merge.py)."""
        from training.run.merge import merge_and_evaluate

        merge_and_evaluate(self, model_path)


