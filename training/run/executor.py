"""The executor's logic (no Ray): probe hardware, prepare models, run training, answer status
queries, hand over run records. ``roles.actors.ExecutorActor`` wraps it.

Runs live under ``<data_dir>/runs/<run_id>/``; ``submit`` returns at once and the run proceeds without
the driver that submitted it: in the actor, in a process of its own (training/run/solo.py: the main
thread of a child that a daemon thread of the executor follows); a plain Executor (tests, ``duet
train``'s helpers) runs it in a daemon thread of this process.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

from training.plan import hardware

from training.run import telemetry
from training.track import follow
from training.data.dataset import version_files
from training.run.engine import TERMINAL, Run
from infra.lazy import lazy

torch = lazy("torch", extra="executor")

RECORD_FILES = ("run.json", "report.md", "loss.png", "events.jsonl")


class ExecutorError(RuntimeError):
    pass


def run_dir(data_dir: str | os.PathLike, run_id: object) -> Path:
    """``<data_dir>/runs/<run_id>`` for a run id that names a folder there and nothing else
    (ExecutorError for ``../x``, ``a/b``, an empty or an overlong id, or a link that leads out)."""
    from training.config import PlanError, check_run_id

    try:
        check_run_id(run_id)
    except PlanError as exc:
        raise ExecutorError(str(exc)) from exc
    runs = (Path(data_dir) / "runs").resolve()
    path = runs / run_id
    if path.resolve().parent != runs:
        raise ExecutorError(f"run {run_id!r}: {path} leads out of {runs}; refusing it")
    return path


def make_spec(plan: dict, version_dir: str | os.PathLike, run_id: str | None = None) -> dict:
    """A self-contained submission: the plan, its model, and the dataset version's files."""
    run_id = run_id or plan["run_id"]
    return {"run_id": run_id, "plan": {**plan, "run_id": run_id}, "model_ref": plan["model_ref"],
            "dataset": {"name": plan["dataset"]["name"], "content_hash": plan["dataset"]["content_hash"],
                        "files": version_files(version_dir)}}


def local_run(plan_file: str | os.PathLike, *, workspace: str | os.PathLike, data_dir: str | os.PathLike | None = None,
              run_id: str | None = None, resume: bool = False) -> Run:
    """A Run for ``duet train``: a plan the architect wrote (configs/<run>.yaml), trained in this
    process; with ``resume`` the existing run is reopened. The plan is validated whole first (the
    typed training config, the run id, the dataset reference); ExecutorError on bad input, before
    anything is created."""
    from training.data.schema import DatasetError
    from training.data.dataset import version_dir as dataset_dir
    from training.config import PlanError, load_plan_file

    path = Path(plan_file).resolve()
    try:
        plan = load_plan_file(path)
    except PlanError as exc:
        raise ExecutorError(str(exc)) from exc
    ws = path.parent.parent if path.parent.name == "configs" else Path(workspace).resolve()
    data_dir = Path(data_dir) if data_dir else ws / ".duet" / "executor"
    run_id = plan["run_id"] if run_id is None else run_id
    rdir = run_dir(data_dir, run_id)
    if resume:
        if not (rdir / "spec.json").exists():
            raise ExecutorError(f"{rdir}: no such run to resume (train it first without --resume)")
        return Run.load(rdir, hardware.probe(data_dir if data_dir.exists() else ".").to_dict())
    if (rdir / "spec.json").exists():
        raise ExecutorError(f"run {run_id} exists in {data_dir}; use --resume, or --run-id NEW")
    try:
        vd = dataset_dir(ws / "datasets", plan["dataset"]["name"], plan["dataset"]["content_hash"])
    except DatasetError as exc:
        raise ExecutorError(f"{plan_file}: {exc}") from exc
    if not (vd / "manifest.json").is_file() or vd.is_symlink():
        raise ExecutorError(f"{plan_file}: dataset {plan['dataset']['name']} @ "
                            f"{plan['dataset']['content_hash'][:12]} is not in {ws / 'datasets'}")
    hw = hardware.probe(data_dir if data_dir.exists() else ".").to_dict()
    return Run(make_spec(plan, vd, run_id), data_dir, hw)


def record_files(rdir: Path) -> dict:
    """A run's small files for the workspace (binary ones base64-encoded) and its record."""
    from infra import safe_files

    if not (rdir / "run.json").is_file():
        raise ExecutorError(f"no record for run {rdir.name!r} under {rdir}")
    out = {}
    try:
        for name in RECORD_FILES:  # inside the run's folder only: a symlink out of it is refused
            try:
                data = safe_files.read_bytes(rdir, name)
            except FileNotFoundError:
                continue
            out[name] = {"b64": base64.b64encode(data).decode()} if name.endswith(".png") \
                else data.decode("utf-8", "replace")
        out["_record"] = safe_files.loads(out["run.json"], str(rdir / "run.json"))
    except (ValueError, KeyError) as exc:
        raise ExecutorError(f"the record of run {rdir.name!r} is damaged: {exc}") from None
    if not isinstance(out["_record"], dict):
        raise ExecutorError(f"the record of run {rdir.name!r} is damaged: {rdir / 'run.json'} is not a JSON object")
    return out


def export(data_dir: str | os.PathLike, run_id: str, *, to: str = "gguf", quant: str = "f16",
           name: str | None = None, out_dir: str | None = None) -> dict:
    """Export a finished run (training/export/exporter.py), merging it first when its merged model is missing
    (the merge's own memory pre-check applies). ExecutorError/ExportError say why not."""
    from training.export.exporter import export_run
    from training.run.preflight import preflight

    rdir = run_dir(data_dir, run_id)
    if not (rdir / "run.json").is_file():
        raise ExecutorError(f"unknown run {run_id!r} under {Path(data_dir) / 'runs'}")
    if not (rdir / "merged" / "config.json").is_file():
        if not (rdir / "adapter" / "adapter_config.json").is_file():
            raise ExecutorError(f"run {run_id}: neither a merged model nor an adapter to merge under {rdir}")
        run = Run.load(rdir, hardware.probe(data_dir).to_dict())
        if run.state != "finished":
            raise ExecutorError(f"run {run_id} is {run.state}: only a finished run is exported")
        run.merge_and_evaluate(Path(run.result.get("model_path") or preflight(run)))
        run.write_record()
    return export_run(rdir, to=to, quant=quant, name=name, out_dir=Path(out_dir) if out_dir else None)


def points_after(losses: list[dict], since_step: int, since_time: float | None) -> tuple[bool, int]:
    """(reset, start): a viewer whose last point is step ``since_step`` logged at ``since_time`` lacks
    ``losses[start:]``; when that point is gone or was logged again (a rollback or a resume re-logs
    steps) it lacks everything: reset, from 0."""
    if since_step > 0:
        for i in range(len(losses) - 1, -1, -1):
            if losses[i]["step"] <= since_step:
                if losses[i]["step"] == since_step and losses[i].get("time") == since_time:
                    return False, i + 1
                break
    return True, 0


def _rss(pid: int | None) -> int:
    """The resident memory of the process that trains (a run's own process, else this one)."""
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return psutil.Process().memory_info().rss


def _file_meta(path: Path) -> dict:
    from training.data.dataset import sha256_file

    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


from training.run import run_files


class Executor:
    def __init__(self, data_dir: str | os.PathLike, *, metrics_port: int | None = 9108,
                 metrics_addr: str = "127.0.0.1", torch_threads: int | None = None, launcher=None,
                 process_per_run: bool = False):
        """``launcher``: starts a data-parallel run's ranks (roles.data_parallel.launch in the actor);
        without one a run with workers > 1 fails with a message that says so. ``process_per_run``: each
        run trains in a child process's main thread (training/run/solo.py; the actor does), else in a
        thread of this process."""
        from infra import malloc

        malloc.tame()  # a long run's RSS stays flat (glibc keeps fragments of freed tensors otherwise)
        self.data_dir = Path(data_dir)
        self.launcher = launcher
        self.process_per_run = process_per_run
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.gpu_source = None  # for the runs' watchdogs; None: NVML when the plan is for CUDA
        self.runs: dict[str, Run] = {}
        self.threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.metrics_port = None
        if metrics_port is not None:
            telemetry.metrics()
            self.metrics_port = telemetry.serve(metrics_port, metrics_addr)
            telemetry.register_once(f"trackers:{self.data_dir.resolve()}", lambda: follow.StatusCollector(self.data_dir))
        n = torch_threads or int(os.environ.get("DUET_TORCH_THREADS", "0")) or hardware.available_cpus()
        os.environ["OMP_NUM_THREADS"] = str(n)
        self.torch_threads = n
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

    def hold_data_dir(self, timeout: float = 30) -> None:
        """Hold this data dir for the life of the process (an executor actor does): a second executor
        on it would resume and train the same runs (ExecutorError naming the holder)."""
        try:
            self._dir_lock = run_files.hold_dir(self.data_dir, timeout)
        except RuntimeError as exc:
            raise ExecutorError(f"{exc}: give each executor its own --data-dir") from None

    def resume_interrupted(self) -> list[str]:
        """Continue every run this data dir holds that was neither finished, failed nor cancelled
        (the actor or its node died mid-run): each resumes from its newest valid checkpoint."""
        runs_dir = self.data_dir / "runs"
        out = []
        for rj in sorted(runs_dir.glob("*/run.json")) if runs_dir.exists() else []:
            try:
                state = json.loads(rj.read_text()).get("status")
            except (OSError, ValueError):
                continue
            run_id = rj.parent.name
            if state in TERMINAL or run_id in self.runs or not (rj.parent / "spec.json").exists():
                if state in TERMINAL and (rj.parent / "tracking").is_dir():
                    follow.start(rj.parent)  # a backlog left when the executor stopped (it exits at once if none)
                continue
            self._start(Run.load(rj.parent, self.probe()), resume=True)
            out.append(run_id)
        return out

    def _start(self, run: Run, resume: bool = False) -> None:
        torch.set_num_threads(self.torch_threads)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        self.runs[run.run_id] = run
        run.gpu_source = self.gpu_source
        run.launcher, run.torch_threads = self.launcher, self.torch_threads
        if self.process_per_run and run.train_cfg.world_size == 1:  # data-parallel ranks have processes of their own
            from training.run import solo

            t = threading.Thread(target=solo.supervise, args=(run, resume, self.torch_threads), name=f"duet-run-{run.run_id}",
                                 daemon=True)
        else:
            t = threading.Thread(target=run.execute, kwargs={"resume": resume}, name=f"duet-run-{run.run_id}",
                                 daemon=True)
        self.threads[run.run_id] = t
        t.start()
        follow.start(run.dir)  # report_to: the run's trackers fed by a process of their own (training/track/follow.py)

    def probe(self) -> dict:
        return hardware.probe(self.data_dir).to_dict()

    def prepare_model(self, ref: str) -> dict:
        """Resolve (convert/build once) a model and return its config.json for planning."""
        from training import models

        return models.model_config(ref)

    def submit(self, spec: dict) -> str:
        run_id = spec["run_id"]
        rdir = run_dir(self.data_dir, run_id)
        with self._lock:
            if run_id in self.runs and self.runs[run_id].state not in TERMINAL:
                return run_id
            if (rdir / "spec.json").exists():
                raise ExecutorError(f"run {run_id!r} already exists on this executor; resume it instead")
            self._start(Run(spec, self.data_dir, self.probe()))
        return run_id

    def _run(self, run_id: str) -> Run:
        rdir = run_dir(self.data_dir, run_id)
        if run_id not in self.runs and (rdir / "spec.json").exists():
            self.runs[run_id] = Run.load(rdir, self.probe())
        if run_id not in self.runs:
            raise ExecutorError(f"unknown run {run_id!r} on this executor (known: {', '.join(self.runs) or 'none'})")
        return self.runs[run_id]

    def status(self, run_id: str, since: int = 0) -> dict:
        return self._run(run_id).snapshot(since)

    def watch(self, run_id: str, points: int = 120) -> dict:
        """A snapshot for `duet watch`: progress, recent losses, alerts, GPU and process memory."""
        run = self._run(run_id)
        snap = run.snapshot(max(0, len(run.events) - 200))
        alerts = [e for e in snap["events"] if e["event"] in ("alert", "thermal_pause", "thermal_resume", "oom",
                                                                "rollback", "error")][-8:]
        return {"run_id": run_id, "state": snap["state"], "progress": snap["progress"], "error": snap["error"],
                "losses": [[x["step"], x["loss"]] for x in run.losses[-points:]],
                "eval_losses": [[x["step"], x["eval_loss"]] for x in run.eval_losses[-points:]],
                "alerts": alerts, "watchdog": run.watchdog.describe() if run.watchdog is not None else None,
                "process_rss_bytes": _rss(getattr(run, "child_pid", None)), "time": time.time()}

    def list(self) -> list[dict]:
        """Runs of this process, plus finished ones found on disk (an earlier process's): state, step,
        and what a runs table shows (phase, ETA, the latest loss, eval loss and tokens/s)."""
        out = {}
        for r in list(self.runs.values()):
            p = r.progress
            out[r.run_id] = {"run_id": r.run_id, "name": r.train_cfg.name, "phase": r.phase, "state": r.state,
                             "step": p["step"], "max_steps": p["max_steps"], "moved_to": r.result.get("moved_to"),
                             "started": r.started, "eta_s": p.get("eta_s") if r.state not in TERMINAL else None,
                             "loss": p.get("loss"), "eval_loss": p.get("eval_loss") or r.result.get("eval_loss_after"),
                             "tokens_per_second": p.get("tokens_per_second") or r.result.get("tokens_per_s"),
                             "executor": (r.spec.get("placement") or {}).get("executor")}
        runs_dir = self.data_dir / "runs"
        for rj in sorted(runs_dir.glob("*/run.json")) if runs_dir.exists() else []:
            if rj.parent.name not in out:
                try:
                    rec = json.loads(rj.read_text())
                except (OSError, ValueError):
                    continue
                out[rec["run_id"]] = {"run_id": rec["run_id"], "name": rec.get("name"), "phase": rec.get("phase"),
                                      "state": rec["status"], "step": rec.get("steps") or 0,
                                      "max_steps": rec["config"]["train"]["max_steps"], "moved_to": rec.get("moved_to"),
                                      "started": rec.get("started"), "eta_s": None,
                                      "loss": rec.get("train_loss_final"), "eval_loss": rec.get("eval_loss_after"),
                                      "tokens_per_second": rec.get("tokens_per_s"),
                                      "executor": (rec.get("placement") or {}).get("executor")
                                      if isinstance(rec.get("placement"), dict) else None}
        return list(out.values())

    def series(self, run_id: str, since_step: int = 0, since_time: float | None = None, since_seq: int = 0,
               eval_key: str | None = None) -> dict:
        """What a live chart lacks: the logged steps after ``since_step`` (or all of them, ``reset``,
        when the viewer's last point is gone or was replaced: a rollback or a resume re-logs steps),
        the eval losses when they changed (``eval_key``), the events after ``since_seq``, progress."""
        run = self._run(run_id)
        losses = run.losses
        reset, start = points_after(losses, since_step, since_time)
        if reset and run.trimmed:  # a viewer that lacks older steps than memory holds: from losses.jsonl
            losses = run.all_losses()
            reset, start = points_after(losses, since_step, since_time)
        ev = run.eval_losses
        key = f"{len(ev)}:{ev[-1]['step']}:{ev[-1]['eval_loss']}" if ev else "0"
        snap = run.snapshot(since_seq)
        return {"run_id": run_id, "state": snap["state"], "phase": run.phase, "progress": snap["progress"],
                "error": snap["error"], "reset": reset, "points": losses[start:],
                "eval": ev if key != eval_key else None, "eval_key": key, "events": snap["events"],
                "next_seq": since_seq + len(snap["events"]), "checkpoints": list(run.checkpoints),
                "watchdog": run.watchdog.describe() if run.watchdog is not None else None, "time": time.time()}

    def cancel(self, run_id: str) -> dict:
        self._run(run_id).cancel()
        return {"run_id": run_id, "cancel_requested": True}

    def pause(self, run_id: str) -> dict:
        self._run(run_id).pause()
        return {"run_id": run_id, "pause_requested": True}

    def resume(self, run_id: str) -> dict:
        self._run(run_id).resume()
        return {"run_id": run_id, "resumed": True}

    def fetch_record(self, run_id: str) -> dict:
        return record_files(run_dir(self.data_dir, run_id))

    def export(self, run_id: str, opts: dict) -> dict:
        """``duet export`` on this host: the exported entry (files stay here; ``read_export`` fetches)."""
        run = self.runs.get(run_id)
        if run is not None and run.state not in TERMINAL:
            raise ExecutorError(f"run {run_id} is {run.state}: export it once it has finished")
        entry = export(self.data_dir, run_id, **opts)
        follow.start(run_dir(self.data_dir, run_id))  # the export's paths and checks reach the trackers
        return entry

    def read_export(self, run_id: str, path: str, offset: int, size: int) -> bytes:
        """A chunk of an exported file, for ``duet export --fetch`` (only files of the run's exports)."""
        rec = json.loads((run_dir(self.data_dir, run_id) / "run.json").read_text())
        allowed = {f["path"] for e in rec.get("exported", []) for f in e["files"].values() if "bytes" in f}
        if path not in allowed:
            raise ExecutorError(f"{path} is not an exported file of run {run_id}")
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    # -- moving a run to another executor (training/run/moving.py; roles/move.py drives it) ------------

    def release(self, run_id: str, to: str) -> dict:
        """Stop the run here (at its next step, if it trains) so that executor ``to`` continues it;
        returns what moves (the newest valid checkpoint and the logs), each file with its SHA-256."""
        from training.run import moving

        run = self._run(run_id)
        if run.state in ("finished", "merging", "reporting"):  # its training is done: moving it would train again
            raise ExecutorError(f"run {run_id} has finished training ({run.state}); there is nothing to move")
        if run.state not in TERMINAL:
            run.cancel()
            self.wait(run_id, timeout=900)
            if run.state not in TERMINAL:
                raise ExecutorError(f"run {run_id} did not stop within 900 s; nothing moved")
            if run.state == "finished":  # it ended its last step as the cancel came
                raise ExecutorError(f"run {run_id} finished before it could stop; there is nothing to move")
        try:
            manifest = moving.bundle(run.dir)
        except moving.MoveError as exc:
            raise ExecutorError(str(exc)) from exc
        run.result["moved_to"] = to
        run.error = f"moved to {to} (from {manifest['checkpoint']})"
        run.write_record()
        manifest["files"] = [f if f["path"] != "run.json" else {**f, **_file_meta(run.dir / "run.json")}
                             for f in manifest["files"]]
        return manifest

    def read_run_file(self, run_id: str, manifest: dict, path: str, offset: int, size: int) -> bytes:
        from training.run import moving

        return moving.read_chunk(run_dir(self.data_dir, run_id), manifest, path, offset, size)

    def adopt_begin(self, manifest: dict) -> None:
        from training.run import moving

        run_dir(self.data_dir, manifest["run_id"])  # a run id that names a folder here
        try:
            moving.begin(self.data_dir / "runs", manifest)
        except moving.MoveError as exc:
            raise ExecutorError(str(exc)) from exc

    def adopt_write(self, manifest: dict, path: str, offset: int, data: bytes) -> None:
        from training.run import moving

        moving.write_chunk(self.data_dir / "runs", manifest, path, offset, data)

    def adopt_finish(self, manifest: dict, moved_from: str) -> str:
        """Verify what arrived, put it in place and resume the run from the moved checkpoint."""
        from training.run import moving

        run_id = manifest["run_id"]
        try:
            rdir = moving.finish(self.data_dir / "runs", manifest, moved_from)
        except moving.MoveError as exc:
            raise ExecutorError(str(exc)) from exc
        with self._lock:
            self.runs.pop(run_id, None)
            self._start(Run.load(rdir, self.probe()), resume=True)
        return run_id

    def wait(self, run_id: str, timeout: float | None = None) -> str:
        t = self.threads.get(run_id)
        if t is not None:
            t.join(timeout)
        return self._run(run_id).state
