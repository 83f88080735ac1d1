"""The run engine: pre-flight, dry run, LoRA/QLoRA SFT and DPO on TRL + PEFT, atomic checkpoints,
deterministic resume, OOM and bad-gradient policies, eval, merge, report.

A plain class (no Ray): the ExecutorActor runs ``Run.execute()`` in a background thread and reads
``Run.snapshot()``; ``duet train`` runs it in the foreground. Everything a run produces lives
under its run dir::

    <data_dir>/runs/<run_id>/
        spec.json  dataset/                      what was submitted (dataset files re-hashed in pre-flight)
        run.json  report.md  loss.png            the record (small: copied to the workspace)
        events.jsonl  losses.jsonl               append-only logs (a resumed step's last entry wins)
        checkpoints/checkpoint-<step>/           adapter + optimizer + scheduler + RNG + trainer state
        adapter/  merged/                        the final adapter and the merged 16/32-bit model

Invariants: run.json is rewritten atomically; events.jsonl and losses.jsonl are append-only; a
failed pre-flight stops the run before any training; a checkpoint is used only if valid
(training/checkpoints.py); every interruption costs at most one checkpoint interval.

Testing facility: ``DUET_FAULT`` injects faults once per run, e.g. ``oom@step=7`` (a genuine
``torch.OutOfMemoryError`` raised as step 7 starts), ``nan@step=8`` (the step's logits become NaN),
``kill@step=12`` (SIGKILL of this process after step 12). Several: comma-separated.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from training import checkpoints, telemetry
from training.dataset import DatasetError, verify_version

TERMINAL = ("finished", "failed", "cancelled")


class PreflightError(RuntimeError):
    pass


def packing_args(packing: bool) -> dict:
    """SFTConfig fields for a plan's ``packing``: TRL's padding-free best-fit packing with "bfd_split" (an
    example longer than seq_len is split across rows; "bfd" would drop the overflow), and evaluation left
    unpacked so eval losses compare across runs and plans."""
    return {"packing": True, "packing_strategy": "bfd_split", "eval_packing": False} if packing else {}


class RunCancelled(Exception):
    pass


class BadGradients(Exception):
    """NaN/inf loss or exploding gradients: roll back to the newest valid checkpoint."""


class GaveUp(RuntimeError):
    """The recovery policy is exhausted."""


def code_sha() -> str:
    """The git SHA of the duet checkout this code runs from, or its package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        import git

        return git.Repo(root).head.commit.hexsha
    except Exception:
        try:
            from importlib.metadata import version

            return f"duet-{version('duet')}"
        except Exception:
            return "unknown"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


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
            if key != "step" or kind not in ("oom", "nan", "kill"):
                raise ValueError
            out[kind] = int(val)
        except ValueError as exc:
            raise ValueError(f"DUET_FAULT {part!r}: use oom|nan|kill@step=N") from exc
    return out


def _jsonl_append(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class Run:
    """One training run. A new run's ``spec`` is what the architect submitted:

    ``{"run_id", "plan": Plan.to_dict(), "model_ref", "dataset": {"name", "content_hash",
    "files": {"train.jsonl": text, "test.jsonl": text, "manifest.json": text}}}``

    ``Run.load(run_dir)`` reopens a run (after a crash, a restart or for ``--resume``).
    """

    def __init__(self, spec: dict, data_dir: str | os.PathLike, hardware: dict, *, _loaded: bool = False):
        from training.dataset import VERSION_FILES
        from training.config import check_run_id

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
        self.state = "queued"
        self.losses: list[dict] = []
        self.eval_losses: list[dict] = []
        self.checkpoints: list[dict] = []
        self.recoveries: list[dict] = []
        self.faults_fired: list[str] = []
        self.lr_scale = 1.0
        self.result: dict = {}
        self.error: str | None = None
        self._train_peak = 0
        self.started = time.time()
        self.gpu_source = None  # the watchdog's GPU readings: NVML when a GPU is visible (tests set a fake)
        self.watchdog = None
        self.peaks = None
        self._pause_reason: str | None = None
        if not _loaded:
            self.dir.mkdir(parents=True, exist_ok=True)
            ds_dir = self.dir / "dataset"
            ds_dir.mkdir(exist_ok=True)
            for name, text in spec["dataset"]["files"].items():
                (ds_dir / name).write_text(text, encoding="utf-8")
            spec = {**spec, "dataset": {k: v for k, v in spec["dataset"].items() if k != "files"}}
            _atomic_json(self.dir / "spec.json", spec)
        self.spec = spec
        self.plan: dict = spec["plan"]
        self.original_train: dict = dict(spec["plan"]["train"])
        self.train_cfg: dict = dict(self.original_train)
        self.phase: str = self.train_cfg["phase"]
        self.progress = {"step": 0, "max_steps": self.train_cfg["max_steps"], "loss": None, "eval_loss": None,
                         "learning_rate": None, "grad_norm": None, "tokens_per_second": None, "eta_s": None}
        if not _loaded:
            self._write_record()

    @classmethod
    def load(cls, run_dir: str | os.PathLike, hardware: dict) -> "Run":
        run_dir = Path(run_dir)
        spec = json.loads((run_dir / "spec.json").read_text())
        run = cls(spec, run_dir.parent.parent, hardware, _loaded=True)
        rec = json.loads((run_dir / "run.json").read_text())
        run.state = rec.get("status", "queued")
        run.started = rec.get("started", run.started)
        run.train_cfg = rec.get("train_effective") or run.train_cfg
        run.recoveries = rec.get("recoveries", [])
        run.faults_fired = rec.get("faults_fired", [])
        run.lr_scale = rec.get("lr_scale", 1.0)
        run.checkpoints = rec.get("checkpoints", [])
        run.eval_losses = rec.get("eval_losses", [])
        run.error = rec.get("error")
        for key in ("eval_loss_before", "preflight", "model_path", "dry_run"):
            if key in rec:
                run.result[key] = rec[key]
        run.losses = run._read_losses()
        if (run.dir / "events.jsonl").exists():
            run.events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines() if x.strip()]
        return run

    # -- state shared with the actor ------------------------------------------------------------

    def emit(self, _event: str, **payload) -> None:
        """Record a run event: kept in memory (the architect polls them), appended to events.jsonl."""
        with self._lock:
            ev = {"seq": len(self.events), "time": time.time(), "run_id": self.run_id, "event": _event, **payload}
            self.events.append(ev)
        _jsonl_append(self.dir / "events.jsonl", ev)

    def set_state(self, state: str) -> None:
        self.state = state
        telemetry.set_state(self.run_id, self.phase, state)
        self.emit("state", state=state)
        self._write_record()

    def snapshot(self, since: int = 0) -> dict:
        with self._lock:
            return {"run_id": self.run_id, "state": self.state, "progress": dict(self.progress),
                    "events": self.events[since:], "error": self.error, "result": dict(self.result),
                    "recoveries": list(self.recoveries)}

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

    def _start_watchdog(self):
        from training.watchdog import RULES, NvmlSource, Watchdog
        from training.config import Thresholds

        src = self.gpu_source
        if src is None and self.plan.get("device") == "cuda":
            src = NvmlSource.detect()
        m = telemetry.metrics()
        for rule, severity in RULES.items():  # series exist at 0 from the start: increase() sees the first alert
            m["alerts"].labels(self.run_id, self.phase, rule, severity)
        for name in ("ooms", "rollbacks", "recoveries", "checkpoints"):
            m[name].labels(self.run_id, self.phase)
        self.watchdog = Watchdog(self.run_id, self.phase, Thresholds.from_train(self.train_cfg), gpu_source=src,
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
            "name": self.train_cfg["name"],
            "phase": self.phase,
            "started": self.started,
            "dataset": {"name": ds["name"], "content_hash": ds["content_hash"], "counts": manifest.get("counts", {})},
            "config": self.plan,
            "train_effective": self.train_cfg,
            "model": {"ref": self.spec["model_ref"], "init_from": self.train_cfg.get("init_from")},
            "code_sha": code_sha(),
            "host": self.hardware,
            "checkpoints": self.checkpoints,
            "recoveries": self.recoveries,
            "faults_fired": self.faults_fired,
            "lr_scale": self.lr_scale,
            "losses": self.losses,
            "eval_losses": self.eval_losses,
            **self.result,
        }

    def _write_record(self) -> None:
        _atomic_json(self.dir / "run.json", self.record())

    def _read_losses(self) -> list[dict]:
        by_step: dict[int, dict] = {}
        path = self.dir / "losses.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    e = json.loads(line)
                    by_step[e["step"]] = e
        return [by_step[k] for k in sorted(by_step)]

    # -- the run ----------------------------------------------------------------------------------

    def _acquire_run_lock(self, timeout: float = 300) -> object:
        """One trainer per run: an flock on <run>/.lock, released by the kernel when its holder dies.
        A resumed run waits here for a dying predecessor (a Ray worker outlives its raylet by seconds)."""
        import fcntl

        fh = open(self.dir / ".lock", "w")
        deadline = time.time() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if waited:
                    self.emit("lock_acquired", waited_s=round(time.time() - (deadline - timeout), 2))
                return fh
            except BlockingIOError:
                if not waited:
                    self.emit("waiting_for_lock", reason="another process still trains this run")
                    waited = True
                if time.time() > deadline:
                    fh.close()
                    raise RuntimeError(f"run {self.run_id} is held by another process for over {timeout:.0f} s")
                time.sleep(0.1)

    def execute(self, resume: bool = False) -> None:
        """Run to completion (or continue a run that was interrupted); never raises: the outcome is
        in state / error / run.json."""
        t0 = time.time()
        lock = None
        from training.phases import PhasePeaks

        self.peaks = PhasePeaks().start()
        try:
            lock = self._acquire_run_lock()
            self.peaks.enter("preflight")
            self.set_state("preflight")
            model_path = self.preflight()
            if not resume and self.train_cfg.get("dry_run_steps"):
                self.set_state("dry-run")
                self.dry_run(model_path)
            self.set_state("training")
            self._start_watchdog()
            self.train(model_path, resume=resume)
            self.watchdog.stop()
            self.set_state("merging")
            self.merge_and_evaluate(model_path)
            self.set_state("reporting")
            self.result["wall_s"] = round(time.time() - t0, 2)
            self.result["peak_memory"] = peak_memory_bytes()
            self._phase_report()
            from training.report import write_loss_plot, write_report

            write_loss_plot(self.dir / "loss.png", self.losses, self.eval_losses, self.run_id)
            self.state = "finished"
            self._write_record()
            write_report(self.dir / "report.md", self.record())
            self.set_state("finished")
        except RunCancelled:
            self.set_state("cancelled")
        except Exception as exc:  # the outcome is reported, not raised, in the background thread
            self.error = f"{type(exc).__name__}: {exc}"
            self.emit("error", message=self.error, traceback=traceback.format_exc()[-4000:])
            self.set_state("failed")
            try:
                from training.report import write_report

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

    def preflight(self) -> Path:
        """Checks before any training; a failure stops the run with the reason."""
        from training import models

        checks = []
        ds = self.spec["dataset"]
        data_dir = self.dir / "dataset"
        try:
            manifest = verify_version(data_dir)
        except DatasetError as exc:
            raise PreflightError(f"dataset: {exc}") from exc
        if manifest["content_hash"] != ds["content_hash"]:
            raise PreflightError(f"dataset: hash {manifest['content_hash'][:12]} is not the submitted "
                                 f"{ds['content_hash'][:12]}")
        checks.append({"check": "dataset hash", "ok": True, "detail": ds["content_hash"][:12]})
        try:
            import torch
        except ImportError as exc:
            raise PreflightError("torch is not installed: pip install 'duet[executor]'") from exc
        checks.append({"check": "torch", "ok": True, "detail": f"{torch.__version__}, CUDA "
                       f"{'available ' + str(torch.version.cuda) if torch.cuda.is_available() else 'not available'}"})
        init_from = self.train_cfg.get("init_from")
        if init_from:
            src = self.dir.parent / init_from
            need = src / ("adapter" if self.phase == "dpo" else "merged")
            if not (need / "config.json").exists() and not (need / "adapter_config.json").exists():
                raise PreflightError(f"init_from {init_from!r}: {need} is missing (run it first on this executor)")
            checks.append({"check": "init_from", "ok": True, "detail": str(need)})
        try:
            model_path = models.resolve(self.spec["model_ref"])
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(model_path)
            AutoTokenizer.from_pretrained(model_path)
        except Exception as exc:
            raise PreflightError(f"model {self.spec['model_ref']!r} does not load: {exc}") from exc
        checks.append({"check": "model loads (config + tokenizer)", "ok": True, "detail": str(model_path)})
        need = self.plan["estimate"]["total_bytes"]
        import psutil

        if self.plan["device"] == "cuda":
            if not torch.cuda.is_available():
                raise PreflightError("the plan is for CUDA but no GPU is visible")
            from training.hardware import bf16_native

            cc = "{}.{}".format(*torch.cuda.get_device_capability(0))
            if self.plan["dtype"] == "bf16" and not bf16_native(cc) and self.train_cfg.get("dtype") != "bf16":
                raise PreflightError(f"the plan trains in bf16 but this GPU (compute capability {cc}) has no native "
                                     "bf16; re-plan (auto picks fp16) or set train.dtype: bf16 to accept emulation")
            free, _total = torch.cuda.mem_get_info()
            if need > free:
                raise PreflightError(f"free VRAM {free / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
            checks.append({"check": "free VRAM", "ok": True, "detail": f"{free / 2**30:.1f} GiB"})
        else:
            free_ram = psutil.virtual_memory().available
            if need > free_ram:
                raise PreflightError(f"free RAM {free_ram / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
            checks.append({"check": "free RAM", "ok": True, "detail": f"{free_ram / 2**30:.1f} GiB"})
        model_bytes = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
        disk_free = shutil.disk_usage(self.dir).free
        need_disk = 2 * model_bytes + 200 * 2**20
        if disk_free < need_disk:
            raise PreflightError(f"free disk {disk_free / 2**30:.1f} GiB < {need_disk / 2**30:.1f} GiB "
                                 "needed for checkpoints and the merged model")
        checks.append({"check": "free disk", "ok": True, "detail": f"{disk_free / 2**30:.1f} GiB"})
        self.result["preflight"] = checks
        self.result["model_path"] = str(model_path)
        self.emit("preflight", checks=checks)
        return Path(model_path)

    # -- building blocks ----------------------------------------------------------------------------

    def _torch_dtype(self):
        return torch_dtype(self.plan["dtype"])

    def _base_path(self, model_path: Path) -> Path:
        """SFT chaining trains a new adapter on the previous run's merged model."""
        init_from = self.train_cfg.get("init_from")
        if init_from and self.phase == "sft":
            return self.dir.parent / init_from / "merged"
        return model_path

    def _load_model(self, model_path: Path, cfg: dict):
        """Base (4-bit for QLoRA) + LoRA adapter: new, or the init_from run's adapter for DPO."""
        init_from = cfg.get("init_from")
        adapter = self.dir.parent / init_from / "adapter" if init_from and self.phase == "dpo" else None
        return load_train_model(self._base_path(model_path), cfg, device=self.plan["device"], dtype=self.plan["dtype"],
                                adapter=adapter)

    def _datasets(self):
        from datasets import Dataset

        from training.dataset import load_split

        def rows(which: str) -> Dataset:
            recs = load_split(self.dir / "dataset", which)
            if self.phase == "dpo":
                return Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                          for r in recs])
            return Dataset.from_list([{"messages": r["messages"]} for r in recs])

        return rows("train"), rows("test")

    def _trainer(self, model, tok, cfg: dict, *, out: Path, max_steps: int, save: bool, evaluate: bool):
        train_ds, test_ds = self._datasets()
        trainer = build_trainer(model, tok, cfg, phase=self.phase, device=self.plan["device"], dtype=self.plan["dtype"],
                                out=out, max_steps=max_steps, evaluate=evaluate, save=save,
                                train_ds=train_ds, eval_ds=test_ds)
        if save:
            _atomic_checkpoints(trainer, keep=cfg["keep_checkpoints"])
        return trainer

    def _tokenizer(self, model_path: Path):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self._base_path(model_path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _free(self) -> None:
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

    def dry_run(self, model_path: Path) -> None:
        """A few steps at micro-batch 1 before the real run: catches a broken setup in seconds."""
        cfg = {**self.train_cfg, "micro_batch": 1, "grad_accum": 1}
        n = int(cfg["dry_run_steps"])
        out = self.dir / "dry_run"
        model = self._load_model(model_path, cfg)
        trainer = self._trainer(model, self._tokenizer(model_path), cfg, out=out, max_steps=n, save=False,
                                evaluate=False)
        t0 = time.time()
        trainer.train()
        dt = time.time() - t0
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        ok = all(math.isfinite(x) for x in losses)
        self.result["dry_run"] = {"steps": n, "seconds_per_step": round(dt / n, 3), "ok": ok,
                                  "losses": losses, "peak_memory": peak_memory_bytes()}
        self.emit("dry_run", **self.result["dry_run"])
        del trainer, model
        shutil.rmtree(out, ignore_errors=True)
        self._free()
        if not ok:
            raise PreflightError(f"the dry run produced a non-finite loss: {losses}")

    def train(self, model_path: Path, resume: bool = False) -> None:
        """Train with the recovery policies; ``resume``: continue from the newest valid checkpoint."""
        import torch

        faults = parse_faults(os.environ.get("DUET_FAULT"))
        ckpt_root = self.dir / "checkpoints"
        from_ckpt = None
        if resume:
            skipped: list = []
            from_ckpt = checkpoints.newest_valid(ckpt_root, skipped)
            if skipped:
                self.emit("checkpoint_skipped", paths=skipped, reason="invalid or partial (size/hash mismatch)")
            self.emit("resume", checkpoint=str(from_ckpt) if from_ckpt else None)
        while True:
            cfg = self.train_cfg
            self._free()
            try:
                self._train_once(model_path, cfg, from_ckpt, faults)
                return
            except torch.OutOfMemoryError as exc:
                self._free()
                telemetry.metrics()["ooms"].labels(self.run_id, self.phase).inc()
                change = self._oom_replan(cfg)
                entry = {"kind": "oom", "step": self.progress["step"], "message": str(exc)[:300], "change": change,
                         "train": {k: self.train_cfg[k] for k in ("micro_batch", "grad_accum", "gradient_checkpointing",
                                                                   "seq_len", "eval_batch")}}
                self.recoveries.append(entry)
                self.emit("oom", **entry)
                if change is None:
                    raise GaveUp(f"out of memory at step {entry['step']} and the OOM policy is exhausted "
                                 f"(micro-batch 1, gradient checkpointing on, eval batch 1): {exc}") from exc
            except BadGradients as exc:
                self._free()
                telemetry.metrics()["rollbacks"].labels(self.run_id, self.phase).inc()
                self.lr_scale *= self.train_cfg.get("rollback_lr_factor", 0.5)
                entry = {"kind": "rollback", "step": self.progress["step"], "reason": str(exc),
                         "lr_scale": self.lr_scale}
                self.recoveries.append(entry)
                self.emit("rollback", **entry)
            if len(self.recoveries) > self.train_cfg.get("max_recoveries", 6):
                raise GaveUp(f"{len(self.recoveries)} recoveries: giving up ({self.recoveries[-1]})")
            telemetry.metrics()["recoveries"].labels(self.run_id, self.phase).inc()
            skipped = []
            from_ckpt = checkpoints.newest_valid(ckpt_root, skipped)
            self.recoveries[-1]["resumed_from"] = str(from_ckpt) if from_ckpt else "start"
            self._drop_losses_after(checkpoints.step_of(from_ckpt) if from_ckpt else 0)
            self._write_record()

    def _drop_losses_after(self, step: int) -> None:
        self.losses = [x for x in self.losses if x["step"] <= step]
        self.eval_losses = [x for x in self.eval_losses if x["step"] <= step]
        self.checkpoints = [c for c in self.checkpoints if c["step"] <= step]

    def _oom_replan(self, cfg: dict) -> dict | None:
        """Halve the micro-batch (doubling accumulation: same effective batch); then gradient
        checkpointing; then a smaller eval batch. None when nothing is left."""
        if cfg["micro_batch"] > 1:
            change = {"micro_batch": cfg["micro_batch"] // 2, "grad_accum": cfg["grad_accum"] * 2}
        elif not cfg["gradient_checkpointing"]:
            change = {"gradient_checkpointing": True}
        elif (cfg.get("eval_batch") or cfg["micro_batch"]) > 1:
            change = {"eval_batch": max(1, (cfg.get("eval_batch") or cfg["micro_batch"]) // 2)}
        else:
            return None
        self.train_cfg = {**cfg, **change}
        return change

    def _train_once(self, model_path: Path, cfg: dict, from_ckpt: Path | None, faults: dict) -> None:
        import torch

        tok = self._tokenizer(model_path)
        self._enter("load")
        model = self._load_model(model_path, cfg)
        trainer = self._trainer(model, tok, cfg, out=self.dir / "checkpoints", max_steps=cfg["max_steps"],
                                save=True, evaluate=True)
        trainer.add_callback(_callbacks(self, faults))
        if from_ckpt is None and "eval_loss_before" not in self.result:
            self._enter("evaluation")
            self.emit("eval_started", which="before")
            before = trainer.evaluate()["eval_loss"]
            self.result["eval_loss_before"] = before
            self.eval_losses.append({"step": 0, "eval_loss": float(before)})
            self.emit("eval", which="before", eval_loss=before)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        self._enter("training")
        trainer.train(resume_from_checkpoint=str(from_ckpt) if from_ckpt else None)
        if self._cancel.is_set():
            raise RunCancelled()
        train_s = time.time() - t0
        self._train_peak = max(self._train_peak, self._training_peak())
        self._free()  # what training held and freed goes back before the evaluation (and its measurement)
        self._enter("evaluation")
        self.emit("eval_started", which="after")
        after = trainer.evaluate()["eval_loss"]
        self.result["eval_loss_after"] = after
        self.emit("eval", which="after", eval_loss=after)
        full = cfg["method"] == "full"
        adapter_dir = self.dir / ("merged" if full else "adapter")  # a full fine-tune's weights are the model
        if full:
            trainer.model.to(self._torch_dtype()).save_pretrained(adapter_dir, safe_serialization=True)
        else:
            trainer.model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        before = self.result.get("eval_loss_before")
        self.result.update({
            "train_s": round(train_s, 2), "steps": trainer.state.global_step, "tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
            "train_loss_final": self.losses[-1]["loss"] if self.losses else None,
            "perplexity_before": math.exp(min(before, 50)) if before is not None and self.phase == "sft" else None,
            "perplexity_after": math.exp(min(after, 50)) if self.phase == "sft" else None,
            ("model_path" if full else "adapter_path"): str(adapter_dir),
            "train_peak_formula_bytes": self._formula_bytes(model_path, cfg),
            "train_peak_bytes": int(self._train_peak),
            "train_peak_measured_as": ("torch.cuda.max_memory_reserved()" if torch.cuda.is_available()
                                       else "peak process RSS during training (sampled every 50 ms)"),
        })
        del trainer, model
        self._free()

    def _training_peak(self) -> int:
        """The peak of the training just done: torch's own on CUDA (reset before train()), else the
        phase sampler's RSS (a per-step reading misses the peak inside a step: 2.9 GB vs 3.6 GB
        on the demo)."""
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_reserved()
        if self.peaks is not None:
            return self.peaks.snapshot().get("training", {}).get("rss_bytes", 0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _enter(self, phase: str) -> None:
        if self.peaks is not None:
            self.peaks.enter(phase)

    def _phase_report(self) -> None:
        """Each phase's measured peak next to the planner's estimate of it (run.json ``phases``)."""
        measured = self.peaks.snapshot()
        est = (self.plan.get("estimate") or {}).get("phases") or {}
        key = "cuda_reserved_bytes" if self.plan.get("device") == "cuda" else "rss_bytes"
        out = {}
        for name, m in measured.items():
            row = {"measured_bytes": m.get(key, m["rss_bytes"]), "measured_as": key}
            if name in est:
                row["estimate_bytes"] = est[name]["total_bytes"] if key == "rss_bytes" else est[name]["reserved_bytes"]
                row["ratio_estimate_to_measured"] = round(row["estimate_bytes"] / max(1, row["measured_bytes"]), 3)
            out[name] = row
        self.result["phases"] = out

    def _formula_bytes(self, model_path: Path, cfg: dict) -> int | None:
        """The planner's formula for the configuration that ran (after any OOM re-plan), in the
        accounting of ``train_peak_bytes`` (no CUDA context): what calibration divides by."""
        from training.memory_model import ModelProfile, estimate
        from training.config import PlanError, TrainConfig
        from training.plan import measured_formula_bytes

        try:
            prof = ModelProfile.from_config(Path(self._base_path(model_path)) / "config.json")
            tc = TrainConfig(**{k: v for k, v in cfg.items() if k in TrainConfig.model_fields})
            bd = estimate(tc, prof, self.plan["device"], bf16=self.plan["dtype"] == "bf16")
        except (PlanError, ValueError, OSError):
            return None
        return measured_formula_bytes(bd)

    def merge_and_evaluate(self, model_path: Path) -> None:
        """Merge, verify and sample (training/merge.py)."""
        from training.merge import merge_and_evaluate

        merge_and_evaluate(self, model_path)


def torch_dtype(name: str):
    """The torch dtype of a plan's ``dtype`` ("fp32", "bf16", "fp16")."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_train_model(path: Path, cfg: dict, *, device: str, dtype: str, adapter: Path | None = None):
    """The model duet trains, as the planner counts it: the base in the plan's dtype (fp32 for a full
    fine-tune, trained under autocast; nf4 with double quantization for QLoRA, its other parameters
    upcast by peft), plus a new LoRA adapter or the given one."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tdt = torch_dtype(dtype)
    # A full fine-tune keeps fp32 weights and trains under bf16/fp16 autocast (mixed precision): fp16
    # weights cannot have their gradients unscaled, and bf16 weights lose small updates.
    kwargs: dict = {"dtype": torch.float32 if cfg["method"] == "full" else tdt}
    if cfg["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if dtype == "fp32" else tdt)
        if device == "cuda":
            kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg["method"] == "qlora":
        _bnb_cpu_workaround(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg["gradient_checkpointing"]))
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if dtype != "fp32" and head is not None and head.weight is not emb.weight:
            head.weight.data = head.weight.data.to(tdt)  # lossless: see training.plan.qlora_head_saving
    if cfg["method"] == "full":
        return model
    torch.manual_seed(cfg["seed"])  # LoRA init draws from the RNG: same seed, same adapter
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    lora = cfg["lora"]
    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))


def build_trainer(model, tok, cfg: dict, *, phase: str, device: str, dtype: str, out: Path, max_steps: int,
                  evaluate: bool, save: bool, train_ds, eval_ds):
    """The TRL trainer duet trains with (SFT or DPO), from a train config: the one place its
    arguments are set, shared by the engine and the planner benchmark (benchmarks/vram_planner.py)."""
    on_cpu = device != "cuda"
    if on_cpu:  # TRL's fused LM head through duet's CPU path (training/fast_loss.py); DUET_CPU_FAST_LOSS=0: TRL's own
        from training import fast_loss

        fast_loss.set_enabled(os.environ.get("DUET_CPU_FAST_LOSS", "1") != "0")
        if dtype == "bf16" and cfg["method"] == "lora" and os.environ.get("DUET_CPU_LORA_FP32", "1") != "0":
            from training import cpu_lora  # LoRA's update added in fp32 (see that module and training.plan)

            cpu_lora.install(model, fast_dropout=os.environ.get("DUET_CPU_FAST_DROPOUT", "1") != "0")
    common = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=cfg["micro_batch"],
        gradient_accumulation_steps=cfg["grad_accum"],
        per_device_eval_batch_size=cfg.get("eval_batch") or cfg["micro_batch"],
        learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=min(cfg["warmup_steps"], max(0, max_steps - 1)), max_length=cfg["seq_len"],
        activation_checkpointing=bool(cfg["gradient_checkpointing"]), seed=cfg["seed"], data_seed=cfg["seed"],
        logging_steps=1, logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg["eval_every"],
        save_strategy="steps" if save else "no", save_steps=cfg["checkpoint_every"], save_total_limit=None,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=on_cpu,
        bf16=dtype == "bf16", fp16=dtype == "fp16",
        # tokens/s counts real tokens: by attention mask when padded; a packed (padding-free) batch has
        # no padding and no mask, and "non_padding" would drop every real token equal to the pad id (EOS)
        include_num_input_tokens_seen="all" if cfg.get("packing") and phase == "sft" else "non_padding",
    )
    if phase == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=cfg.get("dpo_beta", 0.1), **common)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tok)
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**packing_args(cfg["packing"]), **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _bnb_cpu_workaround(model) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 breaks training after an eval-mode forward of a
    4-bit layer unless the layer opts out of that kernel."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def _atomic_checkpoints(trainer, keep: int) -> None:
    """Make the trainer write each checkpoint into a staging folder, then validate + rename it
    (training/checkpoints.py), then keep the newest ``keep`` valid ones."""
    original = trainer._save_checkpoint
    final_root = Path(trainer.args.output_dir)

    def save(model, trial):
        staging = final_root / checkpoints.STAGING
        shutil.rmtree(staging, ignore_errors=True)
        trainer.args.output_dir = str(staging)
        try:
            original(model, trial)
        finally:
            trainer.args.output_dir = str(final_root)
        for staged in checkpoints.listing(staging):
            checkpoints.commit(staged, final_root)
        shutil.rmtree(staging, ignore_errors=True)
        checkpoints.rotate(final_root, keep)

    trainer._save_checkpoint = save


def _callbacks(run: Run, faults: dict):
    from transformers import TrainerCallback

    class DuetCallback(TrainerCallback):
        """Progress, metrics, checkpoints events, fault injection, gradient guard, pause/cancel."""

        def __init__(self):
            self.m = telemetry.metrics()
            self.lab = (run.run_id, run.phase)
            self.t_last = None
            self.tokens_last = 0
            self.t_start = None
            self.explode = 0
            self.hook = None

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            self.t_start = self.t_last = time.time()
            self.tokens_last = int(state.num_input_tokens_seen or 0)
            self.start_step = state.global_step
            self.m["max_steps"].labels(*self.lab).set(state.max_steps)
            if run.lr_scale != 1.0 and optimizer is not None:
                # A rollback restored the optimizer and scheduler: scale the LR from here on.
                for g in optimizer.param_groups:
                    g["lr"] *= run.lr_scale
                if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                    lr_scheduler.base_lrs = [b * run.lr_scale for b in lr_scheduler.base_lrs]

        def _fire(self, kind: str) -> bool:
            if kind in faults and kind not in run.faults_fired:
                run.faults_fired.append(kind)
                run._write_record()
                run.emit("fault_injected", fault=kind, step=faults[kind])
                return True
            return False

        def on_step_begin(self, args, state, control, model=None, **kw):
            step = state.global_step + 1
            if run.watchdog is not None:
                run.watchdog.step_started()
            if faults.get("oom") == step and self._fire("oom"):
                import torch

                raise torch.OutOfMemoryError(f"DUET_FAULT: simulated out of memory at step {step}")
            if faults.get("nan") == step and self._fire("nan") and model is not None:
                def to_nan(_module, _inputs, output):
                    return output * float("nan")  # NaN embeddings: every loss path downstream is NaN

                self.hook = model.get_input_embeddings().register_forward_hook(to_nan)

        def on_step_end(self, args, state, control, **kw):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None
            if run._cancel.is_set():
                control.should_training_stop = True
            if run._pause.is_set():
                control.should_save = True
            now = time.time()
            tokens = int(state.num_input_tokens_seen or 0)
            dt = now - (self.t_last or now)
            dtok = tokens - self.tokens_last
            p = run.progress
            if dt > 0 and dtok > 0:
                tps = dtok / dt
                p["tokens_per_second"] = round(tps, 1)
                self.m["tokens_per_second"].labels(*self.lab).set(tps)
                self.m["tokens"].labels(*self.lab).inc(dtok)
            self.m["samples"].labels(*self.lab).inc(args.per_device_train_batch_size * args.gradient_accumulation_steps)
            self.t_last, self.tokens_last = now, tokens
            if run.watchdog is not None:
                run.watchdog.observe_step(state.global_step, tps if dt > 0 and dtok > 0 else None)
            p["step"] = state.global_step
            done = state.global_step - self.start_step
            if done > 0:
                p["eta_s"] = round((now - self.t_start) / done * (state.max_steps - state.global_step), 1)
            self.m["step"].labels(*self.lab).set(state.global_step)
            self.m["epoch"].labels(*self.lab).set(state.epoch or 0)
            if state.global_step % 50 == 0:
                from training.report import write_loss_plot

                write_loss_plot(run.dir / "loss.png", run.losses, run.eval_losses, run.run_id)
            telemetry.sample_host()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            p = run.progress
            step = state.global_step
            if "loss" in logs:
                loss = float(logs["loss"])
                entry = {"step": step, "loss": loss, "time": round(time.time(), 3), "pid": os.getpid()}
                for key, name in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
                    if logs.get(key) is not None:
                        entry[key] = float(logs[key])
                        self.m[name].labels(*self.lab).set(float(logs[key]))
                        p[key] = float(logs[key])
                run.losses = [x for x in run.losses if x["step"] < step] + [entry]
                _jsonl_append(run.dir / "losses.jsonl", entry)
                p["loss"] = loss
                self.m["loss"].labels(*self.lab).set(loss)
                if faults.get("kill") == step and self._fire("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)  # a crash right after step N's loss is logged
                gn = entry.get("grad_norm")
                if run.watchdog is not None:  # alerts: loss_nan, grad_norm_high, grad_norm_vanishing
                    run.watchdog.observe_log(step, loss, gn)
                # policies (the engine's, not the watchdog's): roll back on NaN or a norm that stays high
                if not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
                    raise BadGradients(f"non-finite loss/grad norm at step {step} (loss {loss}, grad norm {gn})")
                limit = run.train_cfg.get("grad_norm_limit", 10.0)
                self.explode = self.explode + 1 if gn is not None and gn > limit else 0
                if self.explode >= run.train_cfg.get("grad_norm_patience", 3):
                    raise BadGradients(f"gradient norm above {limit} for {self.explode} steps (last {gn:.3g})")
            if "eval_loss" in logs and state.global_step > 0:
                run.eval_losses = [x for x in run.eval_losses if x["step"] != step] + \
                    [{"step": step, "eval_loss": float(logs["eval_loss"])}]
                p["eval_loss"] = float(logs["eval_loss"])
                self.m["eval_loss"].labels(*self.lab).set(float(logs["eval_loss"]))
                run.emit("eval", which=f"step {step}", step=step, eval_loss=float(logs["eval_loss"]))

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            ok = checkpoints.is_valid(ckpt)
            run.checkpoints = [c for c in run.checkpoints if c["step"] != state.global_step] + \
                [{"step": state.global_step, "path": str(ckpt), "valid": ok}]
            self.m["checkpoints"].labels(*self.lab).inc()
            run.emit("checkpoint", step=state.global_step, path=str(ckpt), valid=ok)
            run._write_record()
            if run._pause.is_set():
                run.set_state("paused")
                if run.watchdog is not None:
                    run.watchdog.training = False  # paused is not stalled
                run._resumed.wait()
                if not run._cancel.is_set():
                    run.set_state("training")
                if run.watchdog is not None:
                    run.watchdog.training = True
                    run.watchdog.last_step_at = run.watchdog.clock()

    return DuetCallback()
