"""The architect's recorder: every run that ended on the cluster lands in the design host's
workspace (run record, git commit and tag, session event, both stores), once, whenever the architect
is up: at join, at start, or while it runs. A plain class (no Ray): the recorder actor
(roles/actors.py) runs ``loop`` in a thread; tests drive ``sweep`` with a queue and a fetch of their own.

The head's queue (roles/queue.py) keeps which ended runs are still to record. Recording is claimed
first, with a lease: a driver that follows its run in the foreground holds the claim while it
follows (and records the run itself); one that detached, or died, lets the lease lapse, and the
recorder takes the run. So a run is recorded exactly once, by whoever is there.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Callable, Protocol

LEASE_S = 300.0   # how long a claim holds without renewal (a recording takes seconds)
INTERVAL_S = 2.0  # how often the recorder asks the head


class RecordQueue(Protocol):
    """What the recorder needs of the head's queue (roles/controller.py through the scheduler actor)."""

    def to_record(self) -> list[dict]: ...

    def claim(self, run_id: str, by: str, lease_s: float) -> dict | None: ...

    def recorded(self, run_id: str, by: str, info: dict) -> dict: ...

    def unclaim(self, run_id: str, by: str, error: str | None = None) -> None: ...


def holder_name(kind: str, workspace: str | Path) -> str:
    """Who claims: ``recorder``/``driver``, with its host, process and workspace (for `duet runs show`)."""
    import os

    return f"{kind} pid {os.getpid()} on {socket.gethostname()} ({Path(workspace).resolve()})"


def record_into(workspace: str, postgres_url: str | None, mongo_url: str | None, files: dict,
                session_id: str | None = None) -> dict:
    """Write one ended run into ``workspace`` and the stores: in the session that designed it when
    this workspace holds that session (else a new one), committed, its session synced to both stores.
    A run already in the workspace (runs/<id>/run.json) is not written again."""
    from roles.architect import Architect

    run_id = files["_record"]["run_id"]
    out_dir = Path(workspace) / "runs" / run_id
    if (out_dir / "run.json").exists():
        return {"already": True, "path": str(out_dir), "workspace": str(workspace)}
    known = session_id and (Path(workspace) / "sessions" / session_id / "session.json").is_file()
    arch = Architect(workspace, postgres_url, mongo_url, session_title=f"record {run_id}",
                     session_id=session_id if known else None)
    try:
        out = arch.record_run(files)
        if files["_record"]["status"] == "finished":
            arch.hypothesis_from_run(files["_record"])  # as a driver that followed the run would
        arch.commit_session()
        return {"already": False, "path": out["path"], "commit": out["commit"], "workspace": str(workspace),
                "session_id": arch.session_id}
    finally:
        arch.close()


def catch_up(workspace: str, postgres_url: str | None, mongo_url: str | None, entries: list[dict],
             fetch: Callable[[str, str], dict], belongs: Callable[[dict], bool]) -> list[dict]:
    """A second copy for a host that has no recorder of its own (a design host that drives the cluster
    as a Ray client): every ended run of the queue's ``entries`` that ``belongs`` to it and that ran on
    an executor, written into ``workspace`` when it is not there yet. The head's record is untouched."""
    from infra.run_states import TERMINAL

    out = []
    for e in entries:
        if e["state"] not in TERMINAL or not e.get("executor") or not belongs(e) or \
                (e.get("record") or {}).get("state") not in ("pending", "recorded"):
            continue
        if (Path(workspace) / "runs" / e["run_id"] / "run.json").exists():
            continue
        try:
            got = record_into(workspace, postgres_url, mongo_url, fetch(e["executor"], e["run_id"]))
        except Exception as exc:  # its executor is down: the next catch-up tries again
            out.append({"run_id": e["run_id"], "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        out.append({"run_id": e["run_id"], **got})
    return out


class Recorder:
    def __init__(self, workspace: str, postgres_url: str | None, mongo_url: str | None, queue: RecordQueue,
                 fetch: Callable[[str, str], dict], *, interval: float = INTERVAL_S):
        """``fetch(executor name, run id)``: the run's record files from the executor that trained it."""
        self.workspace = str(Path(workspace).resolve())
        self.urls = (postgres_url, mongo_url)
        self.queue = queue
        self.fetch = fetch
        self.interval = interval
        self.by = holder_name("recorder", self.workspace)
        self.last_error: str | None = None
        self.done: list[dict] = []   # what this recorder recorded (newest last, at most 100)
        self._stop = threading.Event()
        self._sweeping = threading.Lock()  # one sweep at a time: the loop's and one asked for (at join)

    def sweep(self) -> list[dict]:
        """Record every ended run the head holds for recording (the ones no one else holds now)."""
        with self._sweeping:
            return self._sweep()

    def _sweep(self) -> list[dict]:
        out = []
        for e in self.queue.to_record():
            if e.get("workspace") != self.workspace or not e.get("executor") or \
                    not self.queue.claim(e["run_id"], self.by, LEASE_S):
                continue
            try:
                files = self.fetch(e["executor"], e["run_id"])
                got = record_into(self.workspace, *self.urls, files, e.get("session_id"))
            except Exception as exc:  # the executor is down, the workspace refused it: the next sweep retries
                self.queue.unclaim(e["run_id"], self.by, f"{type(exc).__name__}: {exc}")
                self.last_error = f"{e['run_id']}: {type(exc).__name__}: {exc}"[:500]
                continue
            self.queue.recorded(e["run_id"], self.by, got)
            out.append({"run_id": e["run_id"], **got})
        self.done = (self.done + out)[-100:]
        return out

    def loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception as exc:  # the head is away (its node restarts): ask again later
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            self._stop.wait(self.interval)

    def start(self) -> "Recorder":
        threading.Thread(target=self.loop, name="duet-recorder", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
