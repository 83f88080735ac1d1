"""One run over several worker processes (data parallel, one a GPU): what each rank does, the callbacks
that keep the ranks in step, and the executor's side, which follows them through the run's folder.
No Ray here: roles/data_parallel.py starts the ranks through Ray Train (TorchTrainer) and hands each
its rank and Ray Train's ``report``; the executor's actor hands the launcher to the engine.

Rank 0 writes what one process writes (losses.jsonl, events.jsonl, run.json, the checkpoints, the
adapter); every rank writes its RNG state into each checkpoint and a file of its own. In the run
folder (the ranks and the executor share it: one host):

    workers/rank-<r>.json  a rank: pid, host, node, device, attempt, its step time, memory, tokens/s
    control.json           the executor's pause / cancel (rank 0 reads it after every step)
    progress.json          rank 0's progress and watchdog after every step (the executor shows them)
    attempts.json          the attempts of this launch, and the checkpoint the current one resumed from
    failure.json           why the group failed (an OOM, bad gradients), written by the rank that saw it
    outcome.json           how the launch ended: done (with the result) | cancelled | gave_up

Ray Train restarts the whole group from the newest checkpoint when a worker fails or dies
(FailureConfig); the next attempt's rank 0 applies duet's policy to what failed (an OOM re-plans every
worker, bad gradients roll back with a lower learning rate, a lost worker is a restart) and records it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from training.run import policies, run_files, telemetry, watchdog
from training.config import TrainConfig
CONTROL, PROGRESS, ATTEMPTS, FAILURE, OUTCOME = "control.json", "progress.json", "attempts.json", "failure.json", "outcome.json"
PAUSED_FLAG = "rank0.paused"
ENV_PREFIXES = ("DUET_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "PYTORCH_", "CUDA_", "NCCL_")
# Ray assigns each worker its GPUs (CUDA_VISIBLE_DEVICES, read by CUDA at its first call): the
# executor's own value, copied over a worker's, would show every rank the executor's devices
NOT_FORWARDED = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ACCELERATE_TORCH_DEVICE")


def worker_env(threads: int) -> dict:
    """What the ranks' processes need of the executor's environment (offline hub, caches, faults)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and k not in NOT_FORWARDED}
    env.update(OMP_NUM_THREADS=str(threads), DUET_TORCH_THREADS=str(threads), HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    return env


# -- the executor's side ---------------------------------------------------------------------------

def train(run, model_path: Path, resume: bool) -> None:
    """Train ``run`` over ``run.train_cfg.workers`` ranks with the launcher the executor gave it, then
    take over what rank 0 wrote. Raises RunCancelled / GaveUp / RuntimeError like the one-process path."""
    launch = getattr(run, "launcher", None)
    if launch is None:
        raise RuntimeError(f"workers {run.train_cfg.world_size} needs the cluster (`duet run`): `duet train` trains "
                           "in one process; set workers: 1 there")
    d = run.dir
    run_files.atomic_json(d / CONTROL, {"cancel": False, "pause": False})
    run_files.atomic_json(d / ATTEMPTS, {"count": 0, "resume": bool(resume), "from": None})
    (d / OUTCOME).unlink(missing_ok=True)
    (d / PAUSED_FLAG).unlink(missing_ok=True)
    if run.watchdog is not None:
        run.watchdog.stop()  # rank 0 runs the watchdog beside the training; here its readings are shown
    follower = Follower(run)
    run.watchdog = follower
    follower.start()
    cfg = run.train_cfg
    threads = max(1, (getattr(run, "torch_threads", None) or 1) // cfg.world_size) if run.device != "cuda" else 1
    error = None
    try:
        launch(d, world_size=cfg.world_size, device=run.device, env=worker_env(threads),
               max_failures=cfg.max_recoveries + 1, keep=cfg.keep_checkpoints)
    except Exception as exc:  # Ray Train gave up on the group: the outcome (or its absence) says why
        error = exc
    finally:
        follower.stop()
    take_over(run)
    outcome = run_files.read_json(d / OUTCOME, {})
    kind = outcome.get("outcome")
    if kind == "done":
        run.result.update(outcome["result"])
        return
    if kind == "cancelled" or run.cancel_requested():
        raise policies.RunCancelled()
    if kind == "gave_up":
        raise policies.GaveUp(outcome["message"])
    raise RuntimeError(f"data-parallel training failed: {type(error).__name__}: {str(error)[:1500]}")


def take_over(run) -> None:
    """The executor's Run takes what rank 0 recorded (losses, evals, checkpoints, recoveries, the
    configuration after any re-plan, the workers)."""
    rec = run_files.read_json(run.dir / "run.json", {})
    run.losses = run_files.read_by_step(run.dir / "losses.jsonl")
    for key in ("eval_losses", "checkpoints", "recoveries", "faults_fired"):
        setattr(run, key, rec.get(key, getattr(run, key)))
    run.lr_scale = rec.get("lr_scale", run.lr_scale)
    if rec.get("train_effective"):
        run.train_cfg = TrainConfig.model_validate(rec["train_effective"])
    for key in ("eval_loss_before", "world_size", "workers"):
        if key in rec:
            run.result[key] = rec[key]
    ranks = [w for w in (run_files.read_json(f) for f in sorted((run.dir / "workers").glob("rank-*.json"))) if w]
    if ranks:  # each rank's last word: its device, where the Trainer put it, its collectives and telemetry
        run.result["workers"] = ranks


class Follower:
    """Mirrors rank 0's files into the executor's Run (events, losses, progress, state), publishes the
    ranks' telemetry, writes the executor's pause/cancel into control.json; stands in for the run's
    watchdog (``describe``: rank 0's, ``stop``)."""

    def __init__(self, run, interval: float = 0.25):
        self.run, self.interval = run, interval
        self.offsets = {n: (run.dir / n).stat().st_size if (run.dir / n).exists() else 0
                        for n in ("events.jsonl", "losses.jsonl")}
        self.remote: dict | None = None
        self._control: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "Follower":
        self._thread = threading.Thread(target=self._loop, name=f"duet-follow-{self.run.run_id}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception:  # a file between writes: the next pass reads it
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.sync()
        watchdog.track_pids(self.run.run_id, None)

    def describe(self) -> dict:
        return self.remote or {"thresholds": {}, "gpu": None, "active": [], "fired": 0, "thermal_paused": False}

    def _new_lines(self, name: str) -> list[str]:
        path = self.run.dir / name
        if not path.exists():
            return []
        with open(path, "rb") as fh:
            fh.seek(self.offsets[name])
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next pass
        self.offsets[name] += end
        return [x for x in data[:end].decode("utf-8").splitlines() if x.strip()]

    def sync(self) -> None:
        with self._lock:
            run, m = self.run, telemetry.metrics()
            lab = (run.run_id, run.phase)
            for line in self._new_lines("events.jsonl"):
                self._event(json.loads(line), m, lab)
            for line in self._new_lines("losses.jsonl"):
                run.keep_loss(json.loads(line))
            prog = run_files.read_json(run.dir / PROGRESS)
            if prog:
                run.progress.update(prog.get("progress", {}))
                self.remote = prog.get("watchdog") or self.remote
                p = run.progress
                for key, name in (("step", "step"), ("max_steps", "max_steps"), ("loss", "loss"), ("eval_loss", "eval_loss"),
                                  ("learning_rate", "lr"), ("grad_norm", "grad_norm"), ("tokens_per_second", "tokens_per_second")):
                    if p.get(key) is not None:
                        m[name].labels(*lab).set(p[key])
                if prog.get("host"):  # a run in its own process (training/run/solo.py)
                    telemetry.sample_host(prog["host"])
            self._ranks(m, lab)
            want = {"cancel": run.cancel_requested(), "pause": run.pause_requested()}
            if want != self._control:
                run_files.atomic_json(run.dir / CONTROL, want)
                self._control = want

    def _event(self, ev: dict, m: dict, lab: tuple) -> None:
        run = self.run
        run.append_event(ev)
        kind = ev.get("event")
        if kind == "state":
            run.state = ev["state"]
            telemetry.set_state(run.run_id, run.phase, ev["state"])
        elif kind == "eval" and ev.get("step") is not None:
            run.eval_losses = [x for x in run.eval_losses if x["step"] != ev["step"]] + \
                [{"step": ev["step"], "eval_loss": ev["eval_loss"]}]
        elif kind == "checkpoint":
            run.checkpoints = [c for c in run.checkpoints if c["step"] != ev["step"]] + \
                [{"step": ev["step"], "path": ev["path"], "valid": ev.get("valid")}]
            m["checkpoints"].labels(*lab).inc()
        elif kind == "alert":
            m["alerts"].labels(*lab, ev.get("rule", "?"), ev.get("severity", "?")).inc()
        elif kind in ("oom", "rollback", "worker_restart"):
            m["ooms" if kind == "oom" else "rollbacks" if kind == "rollback" else "recoveries"].labels(*lab).inc()

    def _ranks(self, m: dict, lab: tuple) -> None:
        pids = set()
        for f in sorted((self.run.dir / "workers").glob("rank-*.json")):
            w = run_files.read_json(f)
            if not w:
                continue
            if w.get("pid"):
                pids.add(int(w["pid"]))
            rank = str(w["rank"])
            for key, name in (("tokens_per_second", "worker_tokens_per_second"), ("step_seconds", "worker_step_seconds"),
                              ("memory_bytes", "worker_memory_bytes")):
                if w.get(key) is not None:
                    m[name].labels(*lab, rank).set(w[key])
        watchdog.track_pids(self.run.run_id, pids)  # the executor's GPU readings count the ranks' memory
