"""The cluster as the head's controller, the recorder and the drivers reach it: Ray handles found by
name, called and waited for here (with the actor shells in roles/actors.py, the only place that
says ``.remote(``). Everything above this module takes and returns plain data.
"""

from __future__ import annotations

from infra.lazy import lazy
from infra.run_states import TERMINAL
from roles import names
from roles.controller import RunUnknown

ray = lazy("ray", extra="architect")
CALL_TIMEOUT = 15


def call(handle, method: str, *args, timeout: float | None = 60, **kw):
    """``handle.method(*args, **kw)`` on its actor, waited for (``timeout`` seconds; None: no limit)."""
    return ray.get(getattr(handle, method).remote(*args, **kw), timeout=timeout)


def start(handle, method: str, *args, **kw):
    """``handle.method(*args, **kw)`` started on its actor: the reference, for ``ray.wait``/``ray.get``."""
    return getattr(handle, method).remote(*args, **kw)


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


def ask_all(handles: dict, method: str, *args, timeout: float = CALL_TIMEOUT) -> dict:
    """{name: answer} of ``method`` asked of every handle at once; those that fail or do not answer
    in ``timeout`` seconds are left out."""
    refs = {n: getattr(h, method).remote(*args) for n, h in handles.items()}
    if refs:
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    out = {}
    for n, ref in refs.items():
        try:
            out[n] = ray.get(ref, timeout=0.1)
        except Exception:
            continue
    return out


class RayExecutors:
    """``roles.controller.Executors`` over the cluster's named executor actors."""

    def __init__(self):
        self._up: dict = {}

    def answering(self) -> list[str]:
        self._up = answering(find_executors())
        return list(self._up)

    def _handle(self, name: str):
        h = self._up.get(name)
        if h is None:
            h = ray.get_actor(name, namespace=names.NAMESPACE)
        return h

    def status(self, name: str, run_id: str) -> dict:
        try:
            return call(self._handle(name), "status", run_id, 10**9, timeout=CALL_TIMEOUT)
        except ray.exceptions.RayTaskError as exc:
            raise RunUnknown(str(exc)) from None

    def idle(self, names_: list[str]) -> dict[str, dict]:
        hs = {n: self._handle(n) for n in names_}
        runs, hws = ask_all(hs, "list"), ask_all(hs, "probe")
        return {n: hws[n] for n in names_ if n in runs and n in hws
                and not any(r["state"] not in TERMINAL for r in runs[n])}

    def where(self, name: str) -> dict:
        return call(self._handle(name), "ping", timeout=CALL_TIMEOUT)

    def submit(self, name: str, spec: dict) -> None:
        call(self._handle(name), "submit", spec, timeout=CALL_TIMEOUT * 4)

    def cancel(self, name: str, run_id: str) -> dict:
        return call(self._handle(name), "cancel", run_id, timeout=CALL_TIMEOUT)

    def fetch_record(self, name: str, run_id: str) -> dict:
        return call(self._handle(name), "fetch_record", run_id, timeout=120)


def owned(name: str, runs: list[dict], placed: dict[str, str]) -> list[dict]:
    """The runs of an executor's list that are its own: where the queue placed them (a move updates
    that), else where their own record says they were started; never one that moved on. Two executors
    that once shared a data dir both list its runs; each is shown once, by the one that trained it."""
    out = []
    for r in runs:
        if r.get("moved_to"):
            continue
        where = placed.get(r["run_id"]) or r.get("executor")
        if where in (None, name):
            out.append(r)
    return out


def placements(scheduler) -> dict[str, str]:
    """{run id: executor name} as the head's queue has them (empty without a scheduler)."""
    try:
        entries = call(scheduler, "list", timeout=60) if scheduler is not None else []
    except Exception:
        return {}
    return {e["run_id"]: e["executor"] for e in entries if e.get("executor")}


def runs_overview(scheduler) -> dict:
    """`duet runs list`: queued, running and finished runs with their executor node, from the queue's
    entries and from what every executor holds (runs from before the queue, or trained with `duet
    train`). The queue's word on where a run went is final (executors that share a data dir on one
    machine both see its folder); a run that moved on is listed by the executor it moved to; one whose
    executor is down keeps the queue's word for it."""
    rows: dict[str, dict] = {}
    placed: dict[str, str] = {}
    for e in call(scheduler, "list", timeout=60) if scheduler is not None else []:
        rows[e["run_id"]] = {"run_id": e["run_id"], "state": e["state"],
                             "node": e["executor"] and names.node_of(e["executor"]),
                             "ip": (e["node"] or {}).get("ip"), "step": None, "max_steps": None,
                             "queued_at": e["queued_at"], "started_at": e["dispatched_at"], "ended_at": e["ended_at"],
                             "fits_on": [names.node_of(n) for n in e["fits_on"]], "error": e["error"],
                             "group": e.get("group"), "record": e.get("record"),
                             "unreachable_since": e["unreachable_since"]}
        if e["executor"]:
            placed[e["run_id"]] = e["executor"]
    exs = find_executors()
    up = answering(exs)
    for n, runs in ask_all(up, "list", timeout=30).items():
        for r in owned(n, runs, placed):
            row = rows.setdefault(r["run_id"], {"run_id": r["run_id"], "queued_at": None})
            row.update({k: v for k, v in r.items() if k not in ("moved_to", "executor")}, node=names.node_of(n))
    return {"runs": sorted(rows.values(), key=lambda r: (r.get("queued_at") or 0, r["run_id"])),
            "unreachable_executors": [names.node_of(n) for n in exs if n not in up]}


def scheduler_handle():
    """The head's scheduler actor (the run controller), or None when the cluster has none."""
    try:
        return ray.get_actor(names.SCHEDULER_NAME, namespace=names.NAMESPACE)
    except ValueError:
        return None


class HeadQueue:
    """``roles.recorder.RecordQueue`` through the head's scheduler actor, looked up on every call (the
    head may have restarted it); ConnectionError while the cluster has none."""

    def _s(self):
        s = scheduler_handle()
        if s is None:
            raise ConnectionError("the cluster has no scheduler (is the head up?)")
        return s

    def to_record(self) -> list[dict]:
        return call(self._s(), "to_record", timeout=CALL_TIMEOUT)

    def claim(self, run_id: str, by: str, lease_s: float) -> dict | None:
        return call(self._s(), "claim", run_id, by, lease_s, timeout=CALL_TIMEOUT)

    def recorded(self, run_id: str, by: str, info: dict) -> dict:
        return call(self._s(), "recorded", run_id, by, info, timeout=CALL_TIMEOUT)

    def unclaim(self, run_id: str, by: str, error: str | None = None) -> None:
        call(self._s(), "unclaim", run_id, by, error, timeout=CALL_TIMEOUT)

    def get(self, run_id: str) -> dict:
        return call(self._s(), "get", run_id, timeout=CALL_TIMEOUT)
