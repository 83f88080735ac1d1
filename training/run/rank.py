"""One rank of a data-parallel run (training/run/distributed.py has the picture): an attempt of the group
with the same sequence as one process (training/run/attempt.py), plus what keeps the ranks in step: the
pause and cancel decided by rank 0 and broadcast, and the checkpoint committed by rank 0 once every
rank has written its part, then reported to Ray Train.

Runs in a process that Ray Train started, with torch.distributed already set up (gloo on CPU, NCCL on
GPUs); ``report(metrics, checkpoint_dir | None)`` is Ray Train's report, handed in.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from transformers import TrainerCallback

from training.run import checkpoints, memory_cap, policies, run_files
from training.run.callbacks import CheckpointCommit, FaultInjection, Progress, RollbackGuard, parse_faults
from training.run.distributed import ATTEMPTS, CONTROL, FAILURE, OUTCOME, PAUSED_FLAG, PROGRESS
from infra.lazy import lazy
from infra.run_states import RunState

torch = lazy("torch", extra="executor")
dist = lazy("torch.distributed", extra="executor")


class DeviceMismatch(RuntimeError):
    """A tensor or model of this rank is not on the rank's device."""


def rank_device(given) -> "torch.device":
    """The device this rank trains on, from Ray Train (``ray.train.torch.get_device()``: the GPU Ray
    assigned this worker, indexed within the CUDA_VISIBLE_DEVICES it shares with the node's other
    workers), made CUDA's current device before anything else touches CUDA: otherwise every rank's
    first CUDA call opens a context on GPU 0 and reads "cuda:0"."""
    dev = torch.device(given)
    if dev.type == "cuda":
        if dev.index is None:
            raise DeviceMismatch(f"rank device {given!r} names no GPU (want cuda:N, as ray.train.torch.get_device() gives)")
        torch.cuda.set_device(dev)
    return dev


class Group:
    """This rank's collectives, each tensor created on the rank's device and checked there before it is
    handed over: NCCL takes CUDA tensors only ("No backend type associated with device type cpu") and
    gloo CPU ones, so a tensor on another device is refused here, with its device named, on every
    backend (this CPU's gloo included)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = 0

    def check(self, t) -> None:
        if t.device != self.device:
            raise DeviceMismatch(f"collective given a tensor on {t.device}; this rank's collectives run on {self.device}")

    def agree(self, values: list[int]) -> list[int]:
        """Rank 0's values, on every rank (a broadcast)."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        self.check(t)
        dist.broadcast(t, 0)
        self.calls += 1
        return [int(x) for x in t.tolist()]

    def barrier(self) -> None:
        """A barrier on the rank's GPU (NCCL otherwise guesses the device from the rank number)."""
        dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()
        self.calls += 1


def check_trainer_device(trainer, device) -> dict:
    """Where the Trainer put this rank (Accelerate picks cuda:LOCAL_RANK; the rank's device is Ray's):
    its device and the model's, which must both be the rank's. Returns them for the rank's record."""
    dev = torch.device(device)
    tdev = torch.device(trainer.args.device)
    mdev = next(trainer.model.parameters()).device
    same = (lambda d: d.type == dev.type and (dev.type != "cuda" or d.index == dev.index))
    if not (same(tdev) and same(mdev)):
        raise DeviceMismatch(f"rank on {dev}, but the Trainer chose {tdev} and the model is on {mdev} "
                             "(Accelerate's LOCAL_RANK and Ray Train's GPU assignment disagree)")
    return {"trainer_device": str(tdev), "model_device": str(mdev)}


def worker(run_dir: Path, *, rank: int, world_size: int, report, node: str | None = None,
           device: str = "cpu") -> None:
    """One rank's attempt on ``device`` (Ray Train's for this worker). Rank 0 first applies duet's
    policy to what ended the previous attempt."""
    from training import models
    from training.run.attempt import train_attempt
    from training.run.engine import Run

    dev = rank_device(device)  # before any other CUDA call
    threads = int(os.environ.get("DUET_TORCH_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    hw = (run_files.read_json(run_dir / "run.json", {}) or {}).get("host") or {}
    run = Run.load(run_dir, hw)
    run.device_index = dev.index
    main = rank == 0
    group = Group(dev)
    me = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "node": node, "device": str(dev)}
    _put_rank(run_dir, me)
    gave_up = begin_attempt(run, world_size) if main else None
    if group.agree([int(bool(gave_up))])[0]:
        return
    group.barrier()
    if main:
        run.result["workers"] = [run_files.read_json(f) for f in sorted((run_dir / "workers").glob("rank-*.json"))]
        run.write_record()
    else:
        run = Run.load(run_dir, hw)  # the attempt's configuration, as rank 0 wrote it (after any re-plan)
        run.device_index = dev.index
    group.barrier()
    start = run_files.read_json(run_dir / ATTEMPTS, {}).get("from")
    from_ckpt = Path(start) if start else None
    control = RankControl(run, main, me, group)
    cbs = [RankCheckpoint(run, run.train_cfg.keep_checkpoints, main, report, group)]
    if main:
        cbs += [Progress(run), RollbackGuard(run), FaultInjection(run, parse_faults(os.environ.get("DUET_FAULT")))]
        from training.run.phases import PhasePeaks

        run.peaks = PhasePeaks().start()
        run.start_watchdog()
    else:
        cbs.append(RollbackGuard(run))
    cbs.append(control)
    try:
        result = train_attempt(run, models.resolve(run.spec["model_ref"]), run.train_cfg, from_ckpt, cbs, main=main,
                               before_train=control.ready)
    except policies.RunCancelled:
        if main:
            run_files.atomic_json(run_dir / OUTCOME, {"outcome": "cancelled"})
        return
    except Exception as exc:  # noqa: BLE001  (an OOM on any device, or bad gradients: the policy's; others go on up)
        if not (policies.out_of_memory(exc) or isinstance(exc, policies.BadGradients)):
            raise
        kind = "oom" if policies.out_of_memory(exc) else "rollback"
        run_files.atomic_json(run_dir / FAILURE, {"kind": kind, "rank": rank, "step": run.progress.get("step"),
                                                  "message": (str(exc) or type(exc).__name__)[:300],
                                                  "error": type(exc).__name__})
        raise  # Ray Train ends the group and starts it again; the next rank 0 applies the policy
    finally:
        memory_cap.lift()
        if main and run.watchdog is not None:
            run.watchdog.stop()
    if main:
        run.write_record()
        run_files.atomic_json(run_dir / OUTCOME, {"outcome": "done", "result": result})


def begin_attempt(run, world_size: int) -> str | None:
    """Rank 0, before an attempt: count it; after a failure apply the policy (an OOM re-plans every
    worker, bad gradients scale the learning rate, a lost worker is a restart) and record it; choose the
    checkpoint to resume from. Returns why the run gives up, or None."""
    d = run.dir
    att = run_files.read_json(d / ATTEMPTS, {"count": 0, "resume": False})
    att["count"] += 1
    fail = run_files.read_json(d / FAILURE)
    (d / FAILURE).unlink(missing_ok=True)
    restart = att["count"] > 1
    if restart or fail:
        step = run.losses[-1]["step"] if run.losses else 0
        if fail:  # the one policy (training/run/policies.py), as a run in one process applies it
            why = policies.recover(run, fail["kind"], step=fail.get("step") or step, message=fail["message"], error=fail.get("error"),
                                   rank=fail["rank"])
        else:
            why = policies.recover(run, "worker_restart", step=step, attempt=att["count"],
                                   message="a worker ended; Ray Train started the group again")
        if why is not None:
            return _give_up(run, why)
    from_ckpt = None
    if restart or att["resume"] or fail:
        skipped: list = []
        from_ckpt = checkpoints.newest_valid(run.checkpoint_root, skipped)
        if skipped:
            run.emit("checkpoint_skipped", paths=skipped, reason="invalid or partial (size/hash mismatch)")
        run.emit("resume", checkpoint=str(from_ckpt) if from_ckpt else None, attempt=att["count"])
        run.drop_losses_after(checkpoints.step_of(from_ckpt) if from_ckpt else 0)
        if run.recoveries and restart:
            run.recoveries[-1]["resumed_from"] = str(from_ckpt) if from_ckpt else "start"
    att["from"] = str(from_ckpt) if from_ckpt else None
    run_files.atomic_json(d / ATTEMPTS, att)
    run.result["world_size"] = world_size
    run.write_record()
    return None


def _give_up(run, message: str) -> str:
    run_files.atomic_json(run.dir / OUTCOME, {"outcome": "gave_up", "message": message})
    return message


def _put_rank(run_dir: Path, doc: dict) -> None:
    (run_dir / "workers").mkdir(exist_ok=True)
    run_files.atomic_json(run_dir / "workers" / f"rank-{doc['rank']}.json", doc)


class RankCheckpoint(TrainerCallback):
    """Every rank has written its part of the staged checkpoint (rank 0 the weights and optimizer, each
    rank its RNG state) before rank 0 validates and commits it (CheckpointCommit); then every rank
    reports to Ray Train, rank 0 with the committed checkpoint."""

    def __init__(self, run, keep: int, main: bool, report, group: Group):
        self.commit = CheckpointCommit(run, keep) if main else None
        self.run, self.report, self.group = run, report, group

    def on_save(self, args, state, control, **kw):
        self.group.barrier()
        path = None
        if self.commit is not None:
            self.commit.on_save(args, state, control, **kw)
            ckpt = self.run.checkpoint_root / f"checkpoint-{state.global_step}"
            path = str(ckpt) if checkpoints.is_valid(ckpt) else None
        self.group.barrier()
        if self.report is not None:
            self.report({"step": state.global_step, "loss": self.run.progress.get("loss")}, path)


class RankControl(TrainerCallback):
    """After each step every rank does what rank 0 decided: go on, stop (cancel), or save and wait
    (pause: the executor's, through control.json, or the watchdog's thermal pause). Each rank also
    writes its telemetry: step time, memory, its own tokens/s."""

    def __init__(self, run, main: bool, me: dict, group: Group):
        self.run, self.main, self.me, self.group = run, main, dict(me), group
        self.pausing = False
        self.tokens = 0
        self.t_last = time.time()
        self.tokens_last = 0

    def ready(self, trainer) -> None:
        """The trainer is built: check and record where it put this rank, then count its tokens."""
        self.me.update(check_trainer_device(trainer, self.group.device))
        _put_rank(self.run.dir, self.me)
        self.count_tokens(trainer)

    def count_tokens(self, trainer) -> None:
        """This rank's real tokens (by attention mask) in training forwards, through a forward pre-hook."""
        def hook(module, args, kwargs):
            if module.training:
                mask = kwargs.get("attention_mask")
                ids = kwargs.get("input_ids", args[0] if args else None)
                n = mask.sum() if mask is not None else (ids.numel() if ids is not None else 0)
                self._pending = n if self._pending is None else self._pending + n  # a GPU tensor: no sync here
        self._pending = None
        trainer.model.register_forward_pre_hook(hook, with_kwargs=True)

    def _telemetry(self, step: int) -> None:
        import psutil

        if getattr(self, "_pending", None) is not None:  # once a step (the micro-batches' counts summed on device)
            self.tokens += int(self._pending)
            self._pending = None
        now = time.time()
        dt, dtok = now - self.t_last, self.tokens - self.tokens_last
        self.t_last, self.tokens_last = now, self.tokens
        dev = self.group.device
        mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else psutil.Process().memory_info().rss
        _put_rank(self.run.dir, {**self.me, "step": step, "collectives": self.group.calls, "step_seconds": round(dt, 4), "memory_bytes": mem,
                                 "tokens_per_second": round(dtok / dt, 1) if dt > 0 else None, "time": now})

    def on_step_end(self, args, state, control, **kw):
        run = self.run
        self._telemetry(state.global_step)
        flags = [0, 0]
        if self.main:
            ctl = run_files.read_json(run.dir / CONTROL, {})
            flags = [int(run.cancel_requested() or bool(ctl.get("cancel"))), int(run.pause_requested() or bool(ctl.get("pause")))]
        cancel, pause = self.group.agree(flags)
        if self.main:
            run_files.atomic_json(run.dir / PROGRESS, {"progress": run.progress, "state": run.state, "time": time.time(),
                                                       "watchdog": run.watchdog.describe() if run.watchdog else None})
        if cancel:
            run.cancel()
            control.should_training_stop = True
        elif pause:
            self.pausing = True
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        if not self.pausing:
            return
        self.pausing = False
        run, flag = self.run, self.run.dir / PAUSED_FLAG
        if self.main:
            flag.touch()
            run.set_state(RunState.PAUSED)
            if run.watchdog is not None:
                run.watchdog.training = False  # paused is not stalled
        self.group.barrier()
        cancel = 0
        if self.main:
            while True:
                ctl = run_files.read_json(run.dir / CONTROL, {})
                if ctl.get("cancel") or run.cancel_requested():
                    cancel = 1
                    break
                if not ctl.get("pause") and not run.pause_requested():
                    break
                time.sleep(0.2)
            flag.unlink(missing_ok=True)
        else:
            while flag.exists():  # not in a collective while paused: a pause may outlast its timeout
                time.sleep(0.2)
        if self.group.agree([cancel])[0]:
            run.cancel()
            control.should_training_stop = True
        elif self.main:
            run.set_state(RunState.TRAINING)
            if run.watchdog is not None:
                run.watchdog.training = True
                run.watchdog.last_step_at = run.watchdog.clock()
