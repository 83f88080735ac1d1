"""What the dashboard reads and does, each a call to the plain classes the CLI calls (no second copy
of any query): runs through ``roles.run_view`` and the executor actors, datasets through
``training.data.versions``, sessions and memory through ``memory_sync.memory.Memory``, the cluster through
``cluster.cluster_status.status`` and ``infra.monitoring.status``.

The dashboard is a Ray driver of the cluster the workspace belongs to (the embedded head, the node
duet started here, or ``--address``). When no cluster answers, the pages still show what the
workspace recorded (runs, datasets, sessions), and the connection is tried again after a few seconds.
Closing the dashboard changes nothing on the cluster: it only reads, and asks for pause, resume and
cancel when a person clicks them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from infra.lazy import lazy
from roles.client import call

ray = lazy("ray", extra="architect")
RETRY_S = 5.0
CALL_TIMEOUT = 15


class NotFound(LookupError):
    pass


class Refused(RuntimeError):
    """What was asked does not fit (a model beside training): the message and the breakdown (a 409)."""

    def __init__(self, message: str, breakdown: dict):
        super().__init__(message)
        self.breakdown = breakdown


def queued(run_id: str, entry: dict) -> dict:
    """The series of a run still in the queue: no steps yet."""
    return {"run_id": run_id, "state": "queued", "progress": {"step": 0, "max_steps": None}, "points": [], "reset": True,
            "eval": [], "eval_key": "0", "events": [], "next_seq": 0, "checkpoints": [], "error": None,
            "watchdog": None, "source": "queue", "queue": entry}


def checked(run_id: str) -> str:
    """A run id as the executors accept it (ValueError, a 400, before any cluster call)."""
    from training.config import PlanError, check_run_id

    try:
        return check_run_id(run_id)
    except PlanError as exc:
        raise ValueError(str(exc)) from None


class Source:
    def __init__(self, workspace: str | os.PathLike, address: str | None = None):
        self.workspace = Path(workspace).resolve()
        self.address_arg = address
        self.address: str | None = None
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.last_error: str | None = None

    # -- the cluster connection ------------------------------------------------------------------

    def connected(self) -> bool:
        """Connected to the cluster (connecting now if there is one; False while none answers)."""
        from cluster import ray_node, two_host

        with self._lock:
            if "ray" in sys.modules and ray.is_initialized():
                if self._head_answers():
                    return True
                self.last_error = f"the head at {self.address} stopped answering"
                self._down_until = time.time() + RETRY_S
                return False  # every call would wait for its timeout: show the workspace's records instead
            if time.time() < self._down_until:
                return False
            try:
                self.address = two_host.cluster_address(self.workspace, self.address_arg)
                if not self.address:
                    raise ConnectionError(f"no cluster runs for workspace {self.workspace} (`duet up`, or pass --address)")
                ray_node.connect(self.address, timeout=10)
                self.last_error = None
                return True
            except Exception as exc:  # the pages say so and show what the workspace holds
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                self._down_until = time.time() + RETRY_S
                return False

    def _head_answers(self) -> bool:
        from cluster import ray_node
        from infra.services import port_open

        if not self.address:
            return True
        host, port = self.address.removeprefix(ray_node.CLIENT_SCHEME).rsplit(":", 1)
        return port_open(int(port), host, timeout=0.5)

    def _scheduler(self):
        from roles.client import scheduler_handle

        return scheduler_handle() if self.connected() else None

    def executor_for(self, run_id: str):
        """The executor that holds ``run_id`` (remembered per run), or None without a cluster."""
        from cluster import two_host

        if not self.connected():
            return None
        h = self._handles.get(run_id)
        if h is None:
            h = two_host.executor_handle(self.workspace, self.address, run_id=run_id)
            self._handles[run_id] = h
        return h

    def _forget(self, run_id: str) -> None:
        self._handles.pop(run_id, None)

    # -- runs ----------------------------------------------------------------------------------------

    def runs(self) -> dict:
        from roles import run_view

        connected = self.connected()
        try:
            doc = run_view.overview(self.workspace, self._scheduler(), connected=connected)
        except Exception as exc:  # the cluster went away mid-call: the workspace's records still show
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            doc = run_view.overview(self.workspace, None, connected=False)
        doc["cluster_error"] = None if doc["connected"] else self.last_error
        return doc

    def run(self, run_id: str) -> dict:
        """One run's page: its record (from its executor, else the workspace's copy), report, and the
        queue's entry. NotFound when neither the cluster nor the workspace knows it."""
        from roles import run_view

        checked(run_id)
        out = {"run_id": run_id, "record": None, "report": None, "queue": None, "source": None}
        if self.connected():
            try:
                out["queue"] = run_view.queue_entry(self._scheduler(), run_id)
                files = call(self.executor_for(run_id), "fetch_record", run_id, timeout=CALL_TIMEOUT)
                out.update(record=files["_record"], report=files.get("report.md"), source="cluster")
            except Exception:
                self._forget(run_id)
        if out["record"] is None:
            rec = run_view.recorded_run(self.workspace, run_id)
            if rec is not None:
                out.update(record=rec["record"], report=rec["report"], source="workspace")
        if out["record"] is None and out["queue"] is None:
            raise NotFound(f"no run {run_id!r} on the cluster or in {self.workspace / 'runs'}")
        return out

    def series(self, run_id: str, since_step: int = 0, since_time: float | None = None, since_seq: int = 0,
               eval_key: str | None = None) -> dict:
        """The chart points, eval losses and events a viewer lacks (``Executor.series``); from the
        workspace's record when no executor holds the run."""
        from roles import run_view

        checked(run_id)
        ex = self._handles.get(run_id)
        if ex is None and self.connected():
            entry = run_view.queue_entry(self._scheduler(), run_id)
            if entry and entry["state"] == "queued":  # no executor holds it yet: do not ask them all
                return queued(run_id, entry)
            try:
                ex = self.executor_for(run_id)
            except Exception:
                ex = None
        if ex is not None:
            try:
                doc = call(ex, "series", run_id, since_step, since_time, since_seq, eval_key, timeout=CALL_TIMEOUT)
                doc["source"] = "cluster"
                return doc
            except Exception as exc:
                self._forget(run_id)
                err = f"{type(exc).__name__}"
        else:
            err = "no cluster"
        rec = run_view.recorded_run(self.workspace, run_id)
        if rec is None:
            raise NotFound(f"run {run_id!r}: no executor answers for it ({err}) and the workspace has no record")
        return run_view.series_from_record(rec["record"], rec["events"])

    def control(self, run_id: str, action: str) -> dict:
        from roles import run_view

        checked(run_id)
        if action not in run_view.CONTROLS:
            raise ValueError(f"{action!r}: use one of {', '.join(run_view.CONTROLS)}")
        ex = self.executor_for(run_id)
        if ex is None:
            raise ConnectionError(f"no cluster answers ({self.last_error}); {action} needs the run's executor")
        try:
            return run_view.control(run_id, action, ex, self._scheduler())
        except ray.exceptions.RayTaskError as exc:
            raise ValueError(str(getattr(exc, "cause", exc))) from exc

    # -- trying a run's model (training/serve on its executor) -------------------------------------------

    def _on_executor(self, run_id: str, method: str, *args, timeout: float = CALL_TIMEOUT):
        """``chat_<method>`` on the executor that holds ``run_id``; an error raised there is raised here
        as itself (not Ray's wrapper)."""
        checked(run_id)
        ex = self.executor_for(run_id)
        if ex is None:
            raise ConnectionError(f"no cluster answers ({self.last_error}); trying a model needs its executor")
        try:
            return call(ex, f"chat_{method}", *args, timeout=timeout)
        except ray.exceptions.RayTaskError as exc:
            raise getattr(exc, "cause", None) or exc from None

    def _serving(self, run_id: str, method: str, *args, timeout: float = CALL_TIMEOUT):
        """``_on_executor``, with a refusal that keeps its breakdown (Refused, a 409) and bad input as a
        ValueError (a 400)."""
        from training.serve.models import ServeError, ServeRefused

        try:
            return self._on_executor(run_id, method, *args, timeout=timeout)
        except ServeRefused as exc:
            raise Refused(str(exc), exc.breakdown) from None
        except ServeError as exc:
            raise ValueError(str(exc)) from None

    def chat_start(self, run_id: str, model: str, messages: list, settings: dict | None) -> dict:
        from training.serve.models import run_of

        if not isinstance(model, str) or len(model) > 200:
            raise ValueError("model: give base, RUN, RUN@STEP or RUN@latest")
        owner = run_of(run_id, model)
        view = self._serving(owner, "start", run_id, model, messages, settings, timeout=1800)
        return {**view, "owner": owner}

    def chat_poll(self, run_id: str, chat_id: str, offset: int = 0, wait_s: float = 0.0) -> dict:
        return self._serving(run_id, "poll", chat_id, offset, wait_s)

    def held_out(self, run_id: str) -> list[dict]:
        return self._serving(run_id, "held_out", run_id, 50)

    def scores(self, run_id: str, models: list[str]) -> dict:
        return self._serving(run_id, "scores", run_id, models, 20, timeout=1800)

    def judge(self, run_id: str, owners: list[tuple[str, str]], better: int | None, edited: str | None,
              dataset: str, who: str) -> dict:
        """Keep a judgement of the answers ``owners`` names ((run that holds it, chat id) each): their
        texts come from the executors' records, never from the browser."""
        from cluster import embedded
        from roles.architect import record_judgement

        answers = [self._serving(owner, "transcript", cid) for owner, cid in owners]
        pg, mongo = embedded.store_urls(self.workspace)
        return record_judgement(str(self.workspace), pg, mongo, answers, better=better, edited=edited,
                                dataset=dataset, who=who)

    # -- datasets --------------------------------------------------------------------------------------

    def datasets(self) -> list[dict]:
        from training.data import versions

        return versions.list_versions(self.workspace)

    def dataset(self, name: str, ref: str) -> dict:
        from training.data import versions

        return versions.overview(versions.find_version(self.workspace, name, ref))

    def dataset_diff(self, name: str, a: str, b: str) -> dict:
        from training.data import versions

        return versions.diff(versions.find_version(self.workspace, name, a), versions.find_version(self.workspace, name, b))

    # -- sessions and memory ------------------------------------------------------------------------------

    def memory(self):
        from cluster import embedded
        from memory_sync.memory import Memory
        from memory_sync.workspace import Workspace

        Workspace(self.workspace).open()
        return Memory(self.workspace, *embedded.store_urls(self.workspace))

    def sessions(self) -> list[dict]:
        """The workspace's sessions; none while the folder is no workspace yet (nothing was curated or
        logged there)."""
        from memory_sync.workspace import NotAWorkspace

        try:
            mem = self.memory()
        except NotAWorkspace:
            return []
        try:
            return mem.sessions()
        finally:
            mem.close()

    def session(self, sid: str, budget: int = 4096) -> dict:
        from memory_sync import views

        mem = self.memory()
        try:
            sid = mem.session(sid).id
            v = views.view(self.workspace, sid)
            return {"meta": v.meta, "status": v.status, "handoff": views.render_handoff(v), "decisions": v.decisions(),
                    "pinned": v.pinned(), "notes": v.notes(), "next": v.next_step(), "blockers": v.blockers(),
                    "hypotheses": v.hypotheses(), "turns": len(v.turns()), "events": len(v.events),
                    "context": mem.context(sid, budget=budget)}
        finally:
            mem.close()

    def search(self, query: str, threshold: float = 0.75, limit: int = 20) -> dict:
        mem = self.memory()
        try:
            return mem.search(query, threshold, limit)
        finally:
            mem.close()

    def promote(self, hid: str, evidence: str, sid: str | None) -> dict:
        mem = self.memory()
        try:
            if mem.neocortex() is None or mem.cortex() is None:
                raise ConnectionError("promotion needs both stores (DUET_POSTGRES_URL and DUET_MONGO_URL, or `duet up`)")
            sid = mem.session(sid).id if sid else None
            return mem.promote(hid, {"text": evidence}, {"host": mem.host, "via": "duet dashboard"}, sid)
        finally:
            mem.close()

    # -- the cluster -------------------------------------------------------------------------------------

    def cluster(self) -> dict:
        from cluster import cluster_status, ray_node, two_host
        from infra import monitoring

        doc = {"workspace": str(self.workspace), "versions": two_host.local_versions(), "address": None,
               "status": None, "monitoring": monitoring.status(self.workspace)}
        if self.connected():
            doc["address"] = self.address
            try:
                doc["status"] = cluster_status.status(self.address)
                if not ray_node.is_client(self.address):
                    doc["head_versions"] = two_host.read_head_versions(self.address)
            except Exception as exc:
                doc["status"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            doc["status"] = {"error": self.last_error}
        return doc
