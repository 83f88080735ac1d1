"""Runs as people see them, shared by ``duet runs`` and the dashboard (cluster/web): the runs table
(the queue, every executor, and the records committed to the workspace), one run's record, its chart
series when only its record is left, and the pause / resume / cancel controls.

Nothing here needs Ray unless a scheduler or executor handle is passed in: a design host whose
cluster is unreachable still lists and shows the runs its workspace recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from infra.lazy import lazy
from roles.queue import TERMINAL

ray = lazy("ray", extra="architect")
CONTROLS = ("pause", "resume", "cancel")
CALL_TIMEOUT = 60


def _load(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("run_id"), str) else None


def row_from_record(rec: dict) -> dict:
    """A runs-table row from a run record (run.json)."""
    placement = rec.get("placement") or {}
    train = (rec.get("config") or {}).get("train") or {}
    return {"run_id": rec["run_id"], "name": rec.get("name"), "phase": rec.get("phase"), "state": rec.get("status"),
            "node": placement.get("node"), "step": rec.get("steps") or 0, "max_steps": train.get("max_steps"),
            "started": rec.get("started"), "eta_s": None, "loss": rec.get("train_loss_final"),
            "eval_loss": rec.get("eval_loss_after"), "tokens_per_second": rec.get("tokens_per_s"),
            "queued_at": (rec.get("placement") or {}).get("queued_at"), "source": "workspace"}


def recorded_runs(workspace: str | os.PathLike) -> dict[str, dict]:
    """{run id: row} for every run record committed to the workspace (runs/<id>/run.json)."""
    root = Path(workspace) / "runs"
    out = {}
    for rj in sorted(root.glob("*/run.json")) if root.is_dir() else []:
        rec = _load(rj)
        if rec is not None and rec["run_id"] == rj.parent.name:
            out[rec["run_id"]] = row_from_record(rec)
    return out


def recorded_run(workspace: str | os.PathLike, run_id: str) -> dict | None:
    """A run's committed record and report (None when the workspace has no record of it)."""
    from training.config import PlanError, check_run_id

    try:
        check_run_id(run_id)
    except PlanError:
        return None
    d = Path(workspace) / "runs" / run_id
    rec = _load(d / "run.json")
    if rec is None:
        return None
    report = d / "report.md"
    events = d / "events.jsonl"
    return {"record": rec, "report": report.read_text(encoding="utf-8") if report.is_file() else None,
            "events": [json.loads(x) for x in events.read_text(encoding="utf-8").splitlines() if x.strip()]
            if events.is_file() else []}


def overview(workspace: str | os.PathLike, scheduler=None, connected: bool = True) -> dict:
    """`duet runs list` and the dashboard's runs table: what the cluster knows (the queue and every
    answering executor, ``roles.scheduler.runs_overview``) over what the workspace recorded; the
    cluster's word wins for a run both know. Newest first."""
    from roles.scheduler import runs_overview

    doc = runs_overview(scheduler) if connected else {"runs": [], "unreachable_executors": []}
    rows = recorded_runs(workspace)
    for r in doc["runs"]:
        base = rows.get(r["run_id"], {})
        rows[r["run_id"]] = {**base, **{k: v for k, v in r.items() if v is not None or k not in base}, "source": "cluster"}
    doc["runs"] = sorted(rows.values(), key=lambda r: -(r.get("started") or r.get("queued_at") or 0))
    doc["connected"] = connected
    return doc


def sweep_runs(workspace: str | os.PathLike, runs: list[dict], sweep_id: str) -> list[str]:
    """The runs of a sweep: those the queue groups under it, else the ones its committed comparison
    (sweeps/<id>/comparison.json) names."""
    ids = [r["run_id"] for r in runs if r.get("group") == sweep_id]
    if ids:
        return ids
    from training.config import RUN_ID

    if not RUN_ID.fullmatch(str(sweep_id)) or ".." in str(sweep_id):  # a folder name under sweeps/, nothing else
        return []
    comp = Path(workspace) / "sweeps" / str(sweep_id) / "comparison.json"
    if not comp.is_file():
        return []
    try:
        return [r["run_id"] for r in json.loads(comp.read_text(encoding="utf-8")).get("rows", []) if r.get("run_id")]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def series_from_record(rec: dict, events: list[dict]) -> dict:
    """The shape of ``Executor.series`` for a run known only by its record (its executor is gone)."""
    ev = rec.get("eval_losses") or []
    return {"run_id": rec["run_id"], "state": rec.get("status"), "phase": rec.get("phase"),
            "progress": {"step": rec.get("steps") or 0, "max_steps": ((rec.get("config") or {}).get("train") or {})
                         .get("max_steps"), "eta_s": None},
            "error": rec.get("error"), "reset": True, "points": rec.get("losses") or [], "eval": ev,
            "eval_key": "record", "events": events, "next_seq": len(events), "checkpoints": rec.get("checkpoints") or [],
            "watchdog": None, "source": "workspace"}


def queue_entry(scheduler, run_id: str) -> dict | None:
    """The queue's entry for a run (None when the run never went through the queue)."""
    if scheduler is None:
        return None
    try:
        return ray.get(scheduler.get.remote(run_id), timeout=30)
    except ray.exceptions.RayTaskError:
        return None


def control(run_id: str, action: str, executor, scheduler) -> dict:
    """pause | resume | cancel. A queued run is cancelled in the queue (it never starts) and cannot
    be paused; a started one is asked on its executor, which acts after the current step (pause
    also saves a checkpoint). ValueError for what cannot be done."""
    if action not in CONTROLS:
        raise ValueError(f"{action!r}: use one of {', '.join(CONTROLS)}")
    entry = queue_entry(scheduler, run_id)
    if entry and (entry["state"] == "queued" or action == "cancel"):
        if action == "cancel":
            return ray.get(scheduler.cancel.remote(run_id), timeout=CALL_TIMEOUT)
        raise ValueError(f"run {run_id} is queued: `duet runs cancel` it, or wait until it starts")
    if entry and entry["state"] in TERMINAL:
        raise ValueError(f"run {run_id} is {entry['state']}")
    return ray.get(getattr(executor, action).remote(run_id), timeout=CALL_TIMEOUT)
