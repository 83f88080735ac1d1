"""The run queue: runs the architect planned, waiting for an executor, and where each one went.

It lives on the head, the always-on host (``<head data dir>/queue.json``, or
``<workspace>/.duet/queue.json`` on the embedded cluster), so a queued run survives the design host
leaving and the head restarting: the scheduler actor (roles/controller.py) reloads the file and goes on.
Every change is written whole to a temporary file, fsync'd and renamed over the old one.

An entry holds one plan per executor it fits (the architect designed each for that executor's
hardware), the dataset files once, and its state: queued -> running -> finished | failed |
cancelled. ``pick`` chooses what to start where: the oldest queued entry first; among the idle
executors its plans fit (the pinned one only, with ``--on``), the one with the most free memory;
never more than the entry's group (a sweep) allows at a time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from infra.run_states import QUEUE_STATES as STATES, TERMINAL
SCHEMA = 1
# Whether the architect has the run in its workspace: ``waiting`` (not ended), ``pending`` (ended on
# an executor, to record), ``recorded``; ``none`` when there is nothing to record (it never started);
# ``legacy`` for an entry from before the queue tracked this (recorded by hand, or never).
RECORD_STATES = ("waiting", "pending", "recorded", "none", "legacy")


class QueueError(RuntimeError):
    pass


def free_bytes(hw: dict) -> int:
    """What a host has free for a run: VRAM on a GPU host, available RAM on a CPU one."""
    if hw.get("device") == "cuda" and hw.get("gpu_free_bytes") is not None:
        return int(hw["gpu_free_bytes"])
    return int(hw.get("ram_available_bytes") or 0)


def plan_bytes(plan: dict) -> int:
    """What the host must have free for the plan (a data-parallel plan on CPU: every worker's share)."""
    est = plan["estimate"]
    return int(est.get("host_bytes") or est["total_bytes"])


def _slim(e: dict) -> None:
    """An entry that ended keeps its history, not its bulk: the dataset files and the plans' bodies
    (their estimates stay), so the file the queue rewrites on every change stays small."""
    e["dataset"] = {k: v for k, v in e["dataset"].items() if k != "files"}
    e["plans"] = {n: {"estimate": {"total_bytes": plan_bytes(p)}} for n, p in e["plans"].items()}


MAX_QUEUE_BYTES = 256 << 20


def load_entries(path: Path) -> dict[str, dict]:
    """The queue file checked as a whole (schema, every entry's fields, unique run ids) before any
    of it is used: QueueError naming the file, the entry and the problem, never a half-read queue."""
    from infra import safe_files

    hint = "; fix or move it away to start an empty queue (nothing was changed)"
    try:
        doc = safe_files.read_json(path.parent, path.name, MAX_QUEUE_BYTES)
    except (OSError, ValueError) as exc:
        raise QueueError(f"{path}: not a duet queue file ({exc}){hint}") from None
    if not isinstance(doc, dict):
        raise QueueError(f"{path}: not a duet queue file (a JSON {type(doc).__name__}, expected an object with "
                         f"'schema' and 'entries'){hint}")
    if doc.get("schema") != SCHEMA or not isinstance(doc.get("entries"), list):
        raise QueueError(f"{path}: schema {doc.get('schema')!r} with {type(doc.get('entries')).__name__} entries, "
                         f"expected schema {SCHEMA} with a list of entries{hint}")
    from training.config import RUN_ID

    out: dict[str, dict] = {}
    for i, e in enumerate(doc["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict):
            raise QueueError(f"{where}: a JSON {type(e).__name__}, expected an object{hint}")
        rid = e.get("run_id")
        if not isinstance(rid, str) or not RUN_ID.fullmatch(rid) or ".." in rid:
            raise QueueError(f"{where}: run_id {str(rid)[:80]!r} is not a run id{hint}")
        if rid in out:
            raise QueueError(f"{where}: run id {rid!r} appears twice (entries do not share an id){hint}")
        if e.get("state") not in STATES:
            raise QueueError(f"{where} ({rid}): state {str(e.get('state'))[:40]!r}, expected one of "
                             f"{', '.join(STATES)}{hint}")
        plans = e.get("plans")
        if not isinstance(plans, dict) or not plans or not all(
                isinstance(p, dict) and isinstance(p.get("estimate"), dict) for p in plans.values()):
            raise QueueError(f"{where} ({rid}): plans must map each executor to a plan with an estimate{hint}")
        try:
            for p in plans.values():
                plan_bytes(p)
        except (KeyError, TypeError, ValueError):
            raise QueueError(f"{where} ({rid}): a plan's estimate lacks total_bytes (a whole number){hint}") from None
        if not isinstance(e.get("dataset"), dict):
            raise QueueError(f"{where} ({rid}): dataset must be an object{hint}")
        q = e.get("queued_at")
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise QueueError(f"{where} ({rid}): queued_at must be a time (seconds){hint}")
        for key in ("pinned", "group", "title", "executor", "session_id", "workspace"):
            if e.get(key) is not None and not isinstance(e[key], str):
                raise QueueError(f"{where} ({rid}): {key} must be a text or null{hint}")
        rec = e.setdefault("record", {"state": "legacy", "claim": None})
        if not isinstance(rec, dict) or rec.get("state") not in RECORD_STATES or not (
                rec.get("claim") is None or isinstance(rec["claim"], dict)):
            raise QueueError(f"{where} ({rid}): record must be an object with a state of {', '.join(RECORD_STATES)}"
                             f" and a claim (an object or null){hint}")
        mp = e.get("max_parallel")
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 1):
            raise QueueError(f"{where} ({rid}): max_parallel must be a whole number >= 1 or null{hint}")
        out[rid] = e
    return out


class RunQueue:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()  # "~/..." when the head has no executor data dir to name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.entries: dict[str, dict] = {}
        if self.path.exists() or self.path.is_symlink():
            self.entries = load_entries(self.path)

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"schema": SCHEMA, "entries": list(self.entries.values())}, fh, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def add(self, run_id: str, *, plans: dict[str, dict], model_ref: str, dataset: dict, pinned: str | None = None,
            group: str | None = None, max_parallel: int | None = None, title: str | None = None,
            session_id: str | None = None, workspace: str | None = None) -> dict:
        """Queue a run: ``plans`` {executor name: plan} for the executors it fits (at least one).
        ``session_id``: the work session that designed it (its record is logged there); ``workspace``:
        the architect's workspace it belongs to (the recorder of that workspace records it)."""
        if not plans:
            raise QueueError(f"run {run_id}: no executor it fits; nothing queued")
        if pinned is not None and set(plans) != {pinned}:
            raise QueueError(f"run {run_id}: pinned to {pinned} but planned for {', '.join(sorted(plans))}")
        with self._lock:
            if run_id in self.entries:
                raise QueueError(f"run {run_id} is queued already ({self.entries[run_id]['state']})")
            e = {"run_id": run_id, "state": "queued", "plans": plans, "model_ref": model_ref, "dataset": dataset,
                 "pinned": pinned, "group": group, "max_parallel": max_parallel, "title": title,
                 "queued_at": time.time(), "dispatched_at": None, "ended_at": None, "executor": None,
                 "node": None, "error": None, "unreachable_since": None, "session_id": session_id,
                 "workspace": workspace, "record": {"state": "waiting", "claim": None}}
            self.entries[run_id] = e
            self._save()
            return self.public(e)

    def get(self, run_id: str) -> dict:
        with self._lock:
            if run_id not in self.entries:
                raise QueueError(f"run {run_id!r} is not in the queue")
            return self.public(self.entries[run_id])

    @staticmethod
    def public(e: dict) -> dict:
        """An entry without its bulk (the plans' bodies and the dataset files)."""
        out = {k: v for k, v in e.items() if k not in ("plans", "dataset")}
        out["fits_on"] = sorted(e["plans"])
        out["estimates"] = {n: plan_bytes(p) for n, p in e["plans"].items()}
        return out

    def list(self) -> list[dict]:
        with self._lock:
            return [self.public(e) for e in sorted(self.entries.values(), key=lambda e: e["queued_at"])]

    def spec(self, run_id: str, executor: str) -> dict:
        """The submission for ``executor`` (the same shape as training.run.executor.make_spec)."""
        e = self.entries[run_id]
        plan = e["plans"][executor]
        return {"run_id": run_id, "plan": {**plan, "run_id": run_id}, "model_ref": e["model_ref"],
                "dataset": e["dataset"]}

    def cancel(self, run_id: str) -> dict:
        """Cancel a queued run (it never starts). A running one is cancelled on its executor."""
        with self._lock:
            e = self.entries.get(run_id)
            if e is None:
                raise QueueError(f"run {run_id!r} is not in the queue")
            if e["state"] in TERMINAL:
                raise QueueError(f"run {run_id} is {e['state']} already; nothing to cancel")
            if e["state"] == "queued":
                e.update(state="cancelled", ended_at=time.time(), error="cancelled while queued")
                e["record"] = {"state": "none", "claim": None}
                _slim(e)
                self._save()
            return self.public(e)

    def busy(self) -> set[str]:
        with self._lock:
            return {e["executor"] for e in self.entries.values() if e["state"] == "running"} | \
                {e["moving_to"] for e in self.entries.values() if e.get("moving_to")}

    def moving(self, run_id: str, executor: str) -> None:
        """A run is on its way to ``executor`` (`duet runs move`): that executor takes nothing else, and
        the run's end on its old executor (it stops there) is not its end."""
        with self._lock:
            if run_id in self.entries:
                self.entries[run_id]["moving_to"] = executor
                self._save()

    def moved(self, run_id: str, executor: str | None, node: dict | None) -> None:
        """The move is done (``executor`` runs it now), or failed (``executor`` None)."""
        with self._lock:
            e = self.entries.get(run_id)
            if e is None:
                return
            if executor is not None:
                e.update(state="running", executor=executor, node=node, ended_at=None, error=None,
                         unreachable_since=None)
            e["moving_to"] = None
            self._save()

    def pick(self, idle: dict[str, dict]) -> tuple[str, str] | None:
        """(run id, executor) to start next, or None. ``idle``: {executor: its hardware probe} for the
        executors that train nothing now. An entry starts only where its plan fits the memory free
        now, and not beyond its group's ``max_parallel``."""
        with self._lock:
            running: dict[str, int] = {}
            for e in self.entries.values():
                if e["state"] == "running" and e["group"]:
                    running[e["group"]] = running.get(e["group"], 0) + 1
            for e in sorted(self.entries.values(), key=lambda e: e["queued_at"]):
                if e["state"] != "queued":
                    continue
                if e["group"] and e["max_parallel"] and running.get(e["group"], 0) >= e["max_parallel"]:
                    continue
                fits = [n for n in e["plans"] if n in idle and free_bytes(idle[n]) >= plan_bytes(e["plans"][n])]
                if fits:
                    return e["run_id"], max(fits, key=lambda n: (free_bytes(idle[n]), n == e["pinned"]))
            return None

    def started(self, run_id: str, executor: str, node: dict | None) -> None:
        with self._lock:
            self.entries[run_id].update(state="running", executor=executor, node=node, dispatched_at=time.time())
            self._save()

    def ended(self, run_id: str, state: str, error: str | None = None, ran_on_executor: bool = True) -> None:
        """The run ended: recorded later by the architect (``to_record``) when it ran on an executor."""
        if state not in TERMINAL:
            raise QueueError(f"{state!r} is not an end state ({', '.join(TERMINAL)})")
        with self._lock:
            e = self.entries[run_id]
            if e["state"] in TERMINAL:
                return
            e.update(state=state, error=error, ended_at=time.time(), unreachable_since=None)
            if e["record"]["state"] in ("waiting", "legacy"):
                e["record"]["state"] = "pending" if ran_on_executor else "none"
            _slim(e)
            self._save()

    def reachable(self, run_id: str, ok: bool) -> None:
        """Note when a running entry's executor stopped answering (its node died), and when it is back."""
        with self._lock:
            e = self.entries[run_id]
            since = None if ok else (e["unreachable_since"] or time.time())
            if since != e["unreachable_since"]:
                e["unreachable_since"] = since
                self._save()

    # -- recording: the architect records each ended run once, whenever it is up --------------------

    def to_record(self) -> list[dict]:
        """Ended runs not recorded yet, and not held by a live claim (oldest first)."""
        now = time.time()
        with self._lock:
            return [self.public(e) for e in sorted(self.entries.values(), key=lambda e: e["queued_at"])
                    if e["record"]["state"] == "pending" and not _held(e["record"], now)]

    def claim(self, run_id: str, by: str, lease_s: float) -> dict | None:
        """Take (or renew) the right to record ``run_id`` for ``lease_s`` seconds: the entry, or None
        when it is recorded already, has nothing to record, or another holder's lease is live."""
        now = time.time()
        with self._lock:
            e = self.entries.get(run_id)
            if e is None:
                raise QueueError(f"run {run_id!r} is not in the queue")
            rec = e["record"]
            if rec["state"] not in ("waiting", "pending") or (_held(rec, now) and rec["claim"]["by"] != by):
                return None
            rec["claim"] = {"by": by, "until": now + lease_s}
            self._save()
            return self.public(e)

    def recorded(self, run_id: str, by: str, info: dict) -> dict:
        """``by`` recorded the run (``info``: path, commit, workspace); the claim ends."""
        with self._lock:
            e = self.entries[run_id]
            rec = e["record"]
            if rec["state"] == "recorded":
                return self.public(e)
            if rec.get("claim") and rec["claim"]["by"] != by and _held(rec, time.time()):
                raise QueueError(f"run {run_id}: {rec['claim']['by']} holds its record, not {by}")
            e["record"] = {"state": "recorded", "claim": None, "by": by, "at": time.time(),
                           **{k: info.get(k) for k in ("path", "commit", "workspace", "session_id")}}
            self._save()
            return self.public(e)

    def unclaim(self, run_id: str, by: str, error: str | None = None) -> None:
        """Give the claim back (the holder stops following, or recording failed: ``error`` says why;
        the next recorder tries again)."""
        with self._lock:
            e = self.entries.get(run_id)
            if e is None:
                return
            rec = e["record"]
            if rec.get("claim") and rec["claim"]["by"] == by:
                rec["claim"] = None
            if error:
                rec["error"] = error[:500]
                rec["attempts"] = rec.get("attempts", 0) + 1
            self._save()


def _held(rec: dict, now: float) -> bool:
    c = rec.get("claim")
    return bool(c) and float(c.get("until") or 0) > now
