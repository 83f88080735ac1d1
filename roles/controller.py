"""The run controller: the head owns a run from submit to record. A plain class (no Ray): the
scheduler actor (roles/actors.py) wraps it, and unit tests drive it with executors of their own
(``Executors`` is what it needs of them; roles/client.py gives the cluster's).

Once a second (and at once when a run is queued) it
- follows the runs it started: their end state comes from their executor; an executor that does not
  answer (its node died) is noted, and its run stays its own: the executor resumes it from its newest
  valid checkpoint when the node rejoins (checkpoints are local to that host);
- starts queued runs on idle executors (``RunQueue.pick``): an executor is idle when no queued run is
  running on it and it reports no unfinished run of its own (e.g. one resumed after a restart);
- leaves, in the durable queue (``RunQueue.ended``), which ended runs the architect has still to
  record; the design host's recorder (roles/recorder.py) claims them there (``RunQueue.to_record``,
  ``claim``, ``recorded``) whenever it is up, so a run that ends while the laptop is away is recorded when it comes back, once.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from infra.run_states import TERMINAL
from roles import names
from roles.queue import QueueError, RunQueue


class RunUnknown(RuntimeError):
    """The executor answered: it does not know the run."""


class Executors(Protocol):
    """What the controller needs of the cluster's executors (by name: ``duet-executor[:node]``)."""

    def answering(self) -> list[str]:
        """The executors that answer now (one whose node is down is left out)."""

    def status(self, name: str, run_id: str) -> dict:
        """The run's status on that executor (``state``, ``error``); RunUnknown, or ConnectionError when
        it does not answer."""

    def idle(self, names_: list[str]) -> dict[str, dict]:
        """{name: its hardware probe} for those of ``names_`` that train nothing now."""

    def where(self, name: str) -> dict:
        """The executor's ping: ip, host, node_id."""

    def submit(self, name: str, spec: dict) -> None:
        """Start ``spec`` there."""

    def cancel(self, name: str, run_id: str) -> dict:
        """Cancel a run there."""


class RunController:
    def __init__(self, path: str, executors: Executors, interval: float = 1.0, start: bool = True):
        self.q = RunQueue(path)
        self.executors = executors
        self.interval = interval
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._tick_lock = threading.Lock()
        if start:
            threading.Thread(target=self._loop, name="duet-controller", daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.tick()
                self.last_error = None
            except Exception as exc:  # keep dispatching; the error shows in `duet runs list`
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]

    def kick(self) -> None:
        self._wake.set()

    def add(self, run_id: str, **kw) -> dict:
        e = self.q.add(run_id, **kw)
        self.kick()
        return e

    def cancel(self, run_id: str) -> dict:
        """A queued run never starts; a running one is cancelled on its executor."""
        e = self.q.cancel(run_id)
        if e["state"] == "running":
            if e["executor"] not in self.executors.answering():
                raise QueueError(f"run {run_id} runs on {e['executor']}, which is not in the cluster now")
            self.executors.cancel(e["executor"], run_id)
            self.kick()
        return {**e, "cancel_requested": True}

    def tick(self) -> None:
        with self._tick_lock:
            up = self.executors.answering()
            self._follow(up)
            if any(e["state"] == "queued" for e in self.q.list()):
                self._dispatch(up)

    def _follow(self, up: list[str]) -> None:
        for e in self.q.list():
            if e["state"] != "running" or e.get("moving_to"):
                continue
            try:
                if e["executor"] not in up:
                    raise ConnectionError(f"{e['executor']} is not in the cluster")
                st = self.executors.status(e["executor"], e["run_id"])
            except RunUnknown as exc:  # the executor answered: it does not know the run
                self.q.ended(e["run_id"], "failed", f"{e['executor']}: {exc}"[:500], ran_on_executor=False)
                continue
            except Exception:
                self.q.reachable(e["run_id"], False)
                continue
            self.q.reachable(e["run_id"], True)
            if st["state"] in TERMINAL:
                self.q.ended(e["run_id"], st["state"], st.get("error"))

    def _dispatch(self, up: list[str]) -> None:
        busy = self.q.busy()
        idle = self.executors.idle([n for n in up if n not in busy])
        while idle and (choice := self.q.pick(idle)):
            run_id, n = choice
            hw = idle.pop(n)
            try:
                info = self.executors.where(n)
                where = {"executor": n, "node": names.node_of(n), "ip": info.get("ip"), "host": info.get("host"),
                         "node_id": info.get("node_id"), "gpu": hw.get("gpu_name"),
                         "queued_at": self.q.entries[run_id]["queued_at"], "dispatched_at": time.time(),
                         "group": self.q.entries[run_id].get("group")}  # a sweep's id: its runs grouped in the trackers
                self.executors.submit(n, {**self.q.spec(run_id, n), "placement": where})
            except Exception as exc:
                self.q.ended(run_id, "failed", f"could not start on {n}: {type(exc).__name__}: {exc}"[:500],
                             ran_on_executor=False)
                continue
            self.q.started(run_id, n, where)
