"""A run in a process of its own: the executor's actor starts ``python -m training.run.solo <run dir>``
for each run (each attempt after a crash), and the run trains in that process's main thread, as a plain
script, torchrun or Ray Train's workers do. The actor stays free to answer status, pause, resume and
cancel, and a native crash in training (a segfault in a kernel, the kernel's OOM killer, a CUDA abort)
ends the child, never the actor.

The two share the run's folder (one host), as a data-parallel run's ranks do (training/run/distributed.py):

    control.json    the executor's pause / cancel; the child applies each change (``Bridge``)
    progress.json   the child's progress, watchdog, pid and process telemetry, several times a second
    events.jsonl, losses.jsonl, run.json   written by the child's Run, as in one process; the executor's
                    ``Follower`` mirrors them into its Run
    train.log       the child's stdout and stderr

A child that dies by a signal before the run ended is a recovery (``process_restart``) under the run's
``max_recoveries``: the executor starts it again from the newest valid checkpoint. A child that exits
otherwise without an outcome fails the run, with the end of train.log in its error.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from training.run import policies, run_files
from training.run.distributed import CONTROL, PROGRESS, Follower
from infra.run_states import TERMINAL, RunState

LOG = "train.log"
# what a run's record holds besides the executor's result (training/run/engine.py: Run.record)
RECORD_KEYS = {"schema_version", "run_id", "status", "error", "name", "phase", "started", "dataset", "config",
               "train_effective", "model", "code_sha", "host", "placement", "checkpoints", "recoveries",
               "faults_fired", "lr_scale", "losses", "eval_losses"}


# -- the executor's side ---------------------------------------------------------------------------

def child_command(run_dir: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "training.run.solo", str(run_dir)] + (["--resume"] if resume else [])


def child_env(threads: int | None) -> dict:
    import training

    env = dict(os.environ)
    root = str(Path(training.__file__).resolve().parent.parent)  # duet's tree, wherever the actor runs from
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["DUET_PARENT_PID"] = str(os.getpid())
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), DUET_TORCH_THREADS=str(threads))
    return env


def adopt(run, rec: dict) -> None:
    """The executor's Run takes what the child recorded in run.json."""
    from training.config import TrainConfig

    run.state = rec.get("status", run.state)
    run.error = rec.get("error")
    for key in ("checkpoints", "recoveries", "faults_fired", "eval_losses", "lr_scale"):
        if key in rec:
            setattr(run, key, rec[key])
    if rec.get("train_effective"):
        run.train_cfg = TrainConfig.model_validate(rec["train_effective"])
    run.result.update({k: v for k, v in rec.items() if k not in RECORD_KEYS})
    run.losses = run_files.read_by_step(run.dir / "losses.jsonl")


def log_tail(run_dir: Path, chars: int = 1500) -> str:
    try:
        with open(run_dir / LOG, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def ended_by(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def supervise(run, resume: bool, threads: int | None = None) -> None:
    """Run ``run`` in child processes until it ends (finished, failed, cancelled); never raises. The
    executor's thread for the run waits here while the Follower mirrors the child's files."""
    from training.run import telemetry, watchdog

    d = run.dir
    if run.state not in TERMINAL:  # the child's first word is preflight; until it speaks, that is what it does
        run.state = RunState.PREFLIGHT.value
    telemetry.start_run_series(run.run_id, run.phase)  # this process serves the run's metrics
    telemetry.set_state(run.run_id, run.phase, run.state)
    try:
        while True:
            run_files.atomic_json(d / CONTROL, {"cancel": run.cancel_requested(), "pause": run.pause_requested()})
            (d / PROGRESS).unlink(missing_ok=True)
            follower = Follower(run)
            run.watchdog = follower  # the child's watchdog, as its progress.json shows it (kept after the end)
            with open(d / LOG, "ab") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} training process, resume={resume}\n".encode())
                log.flush()
                proc = subprocess.Popen(child_command(d, resume), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=child_env(threads))  # the executor's own working directory
            run.child_pid = proc.pid
            watchdog.track_pids(f"{run.run_id}:process", {proc.pid})  # the card's readings count the child's memory
            follower.start()
            try:
                rc = proc.wait()
            finally:
                follower.stop()
                watchdog.track_pids(f"{run.run_id}:process", None)
                run.child_pid = None
            adopt(run, run_files.read_json(d / "run.json", {}))
            if run.state in TERMINAL:
                return
            why = f"the training process ended with {ended_by(rc)} before the run did"
            if run.cancel_requested():  # it died on its way out: the user's cancel stands
                run.set_state(RunState.CANCELLED)
                return
            if rc >= 0:
                _fail(run, f"{why}; the end of {d / LOG}:\n{log_tail(d)}")
                return
            step = run.losses[-1]["step"] if run.losses else 0
            give_up = policies.recover(run, "process_restart", step=step, message=why, signal=ended_by(rc))
            run.write_record()
            if give_up is not None:
                _fail(run, give_up)
                return
            resume = True
    except Exception as exc:  # noqa: BLE001  (the executor's thread reports, never raises)
        _fail(run, f"{type(exc).__name__}: {exc}")


def _fail(run, message: str) -> None:
    run.error = message
    run.emit("error", message=message)
    run.set_state(RunState.FAILED)


# -- the child's side --------------------------------------------------------------------------------

class Bridge:
    """In the child: applies each change of the executor's control.json (pause, resume, cancel) to the
    Run, and writes progress.json (progress, state, watchdog, process telemetry) several times a second."""

    def __init__(self, run, interval: float = 0.25):
        self.run, self.interval = run, interval
        self.seen = {"cancel": False, "pause": False}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="duet-bridge", daemon=True)
        self._lock = threading.Lock()
        emit = run.emit

        def emit_after_progress(_event: str, **payload) -> None:
            # the executor reads events, then progress.json: written first, the progress it reads with an
            # event (a pause, say) is never older than the event (the step a paused run shows is its own)
            try:
                self.write_progress()
            except Exception:  # noqa: BLE001  (the event matters more than the progress file)
                pass
            emit(_event, **payload)
        run.emit = emit_after_progress

    def start(self) -> "Bridge":
        self.sync()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001  (a file between writes: the next pass reads it)
                pass

    def sync(self) -> None:
        run = self.run
        ctl = run_files.read_json(run.dir / CONTROL, {}) or {}
        want = {"cancel": bool(ctl.get("cancel")), "pause": bool(ctl.get("pause"))}
        if want["cancel"] and not self.seen["cancel"]:
            run.cancel()
        if want["pause"] != self.seen["pause"]:
            run.pause("user") if want["pause"] else run.resume()
        self.seen = want
        self.write_progress()

    def write_progress(self) -> None:
        run = self.run
        with self._lock:
            run_files.atomic_json(run.dir / PROGRESS, {"progress": run.progress, "state": run.state, "time": time.time(),
                                                       "pid": os.getpid(), "host": host_sample(),
                                                       "watchdog": run.watchdog.describe() if run.watchdog else None})


def host_sample() -> dict:
    """This process's readings for the executor to publish, and the nice value it trains at."""
    from training.run.telemetry import host_readings

    return {**host_readings(), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def die_with_parent() -> None:
    """SIGKILL this process when the executor's process dies (Linux), so that a run never trains twice
    after the actor restarts; exits at once when the executor is already gone."""
    parent = int(os.environ.get("DUET_PARENT_PID", "0") or 0)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        os._exit(3)


def normal_priority() -> int:
    """Train at nice 0 where this process may (a Ray worker's child starts at Ray's nice 15 on a cluster
    started without duet's RAY_worker_niceness, cluster/ray_node.py); returns the nice value it trains at."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:  # lowering one's nice value needs CAP_SYS_NICE: it stays as it is
        pass
    return os.getpriority(os.PRIO_PROCESS, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train one run of this executor (started by the executor)")
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    die_with_parent()
    normal_priority()
    from infra import malloc

    malloc.tame()
    import torch

    from training.plan import hardware
    from training.run.engine import Run

    threads = int(os.environ.get("DUET_TORCH_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    run_dir = Path(a.run_dir)
    hw = (run_files.read_json(run_dir / "run.json", {}) or {}).get("host") or hardware.probe(run_dir.parent.parent).to_dict()
    run = Run.load(run_dir, hw)
    run.torch_threads = threads or None
    bridge = Bridge(run).start()
    try:
        run.execute(resume=a.resume)
    finally:
        bridge.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
