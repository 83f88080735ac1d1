"""The scheduler: the queue's dispatcher, in a detached actor on the head (roles/actors.py).

Once a second (and at once when a run is queued) it
- follows the runs it started: their end state comes from their executor; an executor that does not
  answer (its node died) is noted, and its run stays its own: the executor resumes it from its newest
  valid checkpoint when the node rejoins (checkpoints are local to that host);
- starts queued runs on idle executors (``RunQueue.pick``): an executor is idle when no queued run is
  running on it and it reports no unfinished run of its own (e.g. one resumed after a restart).

Executors are found through Ray (``roles.names.executor_names``), so a node that joins later takes
work from the next run planned for it on.
"""

from __future__ import annotations

import threading
import time

from infra.lazy import lazy
from roles import names
from roles.queue import TERMINAL, QueueError, RunQueue

ray = lazy("ray", extra="architect")
CALL_TIMEOUT = 15


def find_executors() -> dict:
    """{executor name: actor handle} for every executor the cluster has now (one whose node is down
    is listed too while Ray waits to restart it: ``answering`` tells them apart)."""
    out = {}
    for n in names.executor_names(ray.util.list_named_actors(all_namespaces=True)):
        try:
            out[n] = ray.get_actor(n, namespace=names.NAMESPACE)
        except ValueError:
            continue
    return out


def answering(exs: dict, timeout: float = 3.0) -> dict:
    """The executors of ``exs`` that answer a ping within ``timeout`` seconds, asked all at once, so a
    node that is down costs one short wait, not one a call."""
    refs = {n: h.ping.remote() for n, h in exs.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout) if refs else ([], [])
    out = {}
    for n, ref in refs.items():
        if ref in ready:
            try:
                ray.get(ref, timeout=0)
                out[n] = exs[n]
            except Exception:
                continue
    return out


class Scheduler:
    def __init__(self, path: str, interval: float = 1.0, start: bool = True):
        self.q = RunQueue(path)
        self.interval = interval
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._tick_lock = threading.Lock()
        if start:
            threading.Thread(target=self._loop, name="duet-scheduler", daemon=True).start()

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
            ex = find_executors().get(e["executor"])
            if ex is None:
                raise QueueError(f"run {run_id} runs on {e['executor']}, which is not in the cluster now")
            ray.get(ex.cancel.remote(run_id), timeout=CALL_TIMEOUT)
            self.kick()
        return {**e, "cancel_requested": True}

    def tick(self) -> None:
        with self._tick_lock:
            exs = answering(find_executors())
            self._follow(exs)
            if any(e["state"] == "queued" for e in self.q.list()):
                self._dispatch(exs)

    def _follow(self, exs: dict) -> None:
        for e in self.q.list():
            if e["state"] != "running" or e.get("moving_to"):
                continue
            h = exs.get(e["executor"])
            try:
                if h is None:
                    raise ConnectionError(f"{e['executor']} is not in the cluster")
                st = ray.get(h.status.remote(e["run_id"], 10**9), timeout=CALL_TIMEOUT)
            except ray.exceptions.RayTaskError as exc:  # the executor answered: it does not know the run
                self.q.ended(e["run_id"], "failed", f"{e['executor']}: {exc}"[:500])
                continue
            except Exception:
                self.q.reachable(e["run_id"], False)
                continue
            self.q.reachable(e["run_id"], True)
            if st["state"] in TERMINAL:
                self.q.ended(e["run_id"], st["state"], st.get("error"))

    def _idle(self, exs: dict) -> dict:
        """{executor: its hardware probe} for the executors that train nothing now, all asked at once."""
        busy = self.q.busy()
        asked = {n: (h.list.remote(), h.probe.remote()) for n, h in exs.items() if n not in busy}
        refs = [r for pair in asked.values() for r in pair]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CALL_TIMEOUT)
        idle = {}
        for n, (runs_ref, hw_ref) in asked.items():
            try:
                runs, hw = ray.get([runs_ref, hw_ref], timeout=0.1)
            except Exception:
                continue
            if not any(r["state"] not in TERMINAL for r in runs):
                idle[n] = hw
        return idle

    def _dispatch(self, exs: dict) -> None:
        idle = self._idle(exs)
        while idle and (choice := self.q.pick(idle)):
            run_id, n = choice
            hw = idle.pop(n)
            try:
                info = ray.get(exs[n].ping.remote(), timeout=CALL_TIMEOUT)
                where = {"executor": n, "node": names.node_of(n), "ip": info.get("ip"), "host": info.get("host"),
                         "node_id": info.get("node_id"), "gpu": hw.get("gpu_name"), "queued_at": self.q.entries[run_id]["queued_at"],
                         "dispatched_at": time.time()}
                spec = {**self.q.spec(run_id, n), "placement": where}
                ray.get(exs[n].submit.remote(spec), timeout=CALL_TIMEOUT * 4)
            except Exception as exc:
                self.q.ended(run_id, "failed", f"could not start on {n}: {type(exc).__name__}: {exc}"[:500])
                continue
            self.q.started(run_id, n, where)


def runs_overview(scheduler) -> dict:
    """`duet runs list`: queued, running and finished runs with their executor node, from the queue's
    entries and from what every executor holds (runs from before the queue, or trained with `duet
    train`). A run that moved on is listed by the executor it moved to; one whose executor is down
    keeps the queue's word for it."""
    rows: dict[str, dict] = {}
    for e in ray.get(scheduler.list.remote(), timeout=60) if scheduler is not None else []:
        rows[e["run_id"]] = {"run_id": e["run_id"], "state": e["state"],
                             "node": e["executor"] and names.node_of(e["executor"]),
                             "ip": (e["node"] or {}).get("ip"), "step": None, "max_steps": None,
                             "queued_at": e["queued_at"], "started_at": e["dispatched_at"], "ended_at": e["ended_at"],
                             "fits_on": [names.node_of(n) for n in e["fits_on"]], "error": e["error"],
                             "group": e.get("group"),
                             "unreachable_since": e["unreachable_since"]}
    exs = find_executors()
    up = answering(exs)
    for n, h in up.items():
        for r in ray.get(h.list.remote(), timeout=30):
            if r.get("moved_to"):
                continue
            row = rows.setdefault(r["run_id"], {"run_id": r["run_id"], "queued_at": None})
            row.update({k: v for k, v in r.items() if k != "moved_to"}, node=names.node_of(n))
    return {"runs": sorted(rows.values(), key=lambda r: (r.get("queued_at") or 0, r["run_id"])),
            "unreachable_executors": [names.node_of(n) for n in exs if n not in up]}
