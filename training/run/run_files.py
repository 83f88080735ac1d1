"""A run's files on the executor: run.json written atomically, append-only JSONL logs (fsync'd per
entry), the run lock, and the provenance (the code's git SHA)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


def atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)



def read_json(path: Path, default=None):
    """A run file's JSON, or ``default`` when it is missing or between writes."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (strict JSON, as the session log wants)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def jsonl_append(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())



def read_by_step(path: Path) -> list[dict]:
    """An append-only JSONL of per-step entries, the last entry of each step winning, in step order."""
    by_step: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                e = json.loads(line)
                by_step[e["step"]] = e
    return [by_step[k] for k in sorted(by_step)]



def acquire_lock(path: Path, emit, what: str, timeout: float = 300) -> object:
    """One trainer per run: an flock on <run>/.lock, released by the kernel when its holder dies.
    A resumed run waits here for a dying predecessor (a Ray worker outlives its raylet by seconds)."""
    fh = open(path, "w")
    deadline = time.time() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if waited:
                emit("lock_acquired", waited_s=round(time.time() - (deadline - timeout), 2))
            return fh
        except BlockingIOError:
            if not waited:
                emit("waiting_for_lock", reason="another process still trains this run")
                waited = True
            if time.time() > deadline:
                fh.close()
                raise RuntimeError(f"{what} is held by another process for over {timeout:.0f} s")
            time.sleep(0.1)

DIR_LOCK = "executor.lock"


def data_dir_holder(data_dir: str | os.PathLike) -> str | None:
    """Who holds an executor's data dir ("pid N on HOST"), or None when no live executor does."""
    path = Path(data_dir) / DIR_LOCK
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def hold_dir(data_dir: Path, timeout: float = 30) -> object:
    """An flock on <data dir>/executor.lock for the life of the process, naming its holder; waits
    ``timeout`` seconds for a predecessor that is still exiting (Ray restarting the actor), then
    RuntimeError naming the holder."""
    import socket

    fh = open(data_dir / DIR_LOCK, "a+")
    deadline = time.time() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.time() >= deadline:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise RuntimeError(f"the data dir {data_dir} is used by another executor ({holder})") from None
            time.sleep(0.5)
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    return fh


def code_sha() -> str:
    """The git SHA of the duet checkout this code runs from, or its package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        import git

        return git.Repo(root).head.commit.hexsha
    except Exception:
        try:
            from importlib.metadata import version

            return f"duet-{version('duet')}"
        except Exception:
            return "unknown"
