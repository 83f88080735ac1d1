"""Runs as people see them, shared by ``duet runs`` and the dashboard (cluster/web): the runs table
(the queue, every executor, and the records committed to the workspace), one run's record, its chart
series when only its record is left, and the pause / resume / cancel controls.

Nothing here needs Ray unless a scheduler or executor handle is passed in: a design host whose
cluster is unreachable still lists and shows the runs its workspace recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

from infra.lazy import lazy
from roles.client import call
from roles.queue import TERMINAL

ray = lazy("ray", extra="architect")
CONTROLS = ("pause", "resume", "cancel")
CALL_TIMEOUT = 60


def _load(path: Path) -> dict | None:
    """A run folder's run.json (read inside the folder, infra/safe_files.py); None when absent,
    ``{"_damaged": why}`` when it is there but unreadable, not a record, or a symlink out of the folder."""
    from infra import safe_files

    try:
        rec = safe_files.read_json(path.parent, path.name)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"_damaged": str(exc)[:300]}
    if not isinstance(rec, dict) or not isinstance(rec.get("run_id"), str):
        return {"_damaged": f"{path}: not a run record (a JSON object with a run_id)"}
    if rec["run_id"] != path.parent.name:
        return {"_damaged": f"{path}: records run {rec['run_id'][:80]!r}, not {path.parent.name!r}"}
    return rec


def damaged_row(run_id: str, why: str) -> dict:
    """A runs-table row for a run folder whose record cannot be read: shown as damaged, never a failed page."""
    return {"run_id": run_id, "name": None, "phase": None, "state": "damaged", "node": None, "step": 0,
            "max_steps": None, "started": None, "eta_s": None, "loss": None, "eval_loss": None,
            "tokens_per_second": None, "queued_at": None, "source": "workspace", "error": why}


def _num(v):
    """A number as a record should hold it, else None (a hand-edited or damaged record's "yesterday")."""
    import math

    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _text(v):
    return v if isinstance(v, str) else None


def row_from_record(rec: dict) -> dict:
    """A runs-table row from a run record (run.json); fields of the wrong type are left out (None)."""
    placement = rec.get("placement") if isinstance(rec.get("placement"), dict) else {}
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    return {"run_id": rec["run_id"], "name": _text(rec.get("name")), "phase": _text(rec.get("phase")),
            "state": _text(rec.get("status")), "node": _text(placement.get("node")), "step": _num(rec.get("steps")) or 0,
            "max_steps": _num(train.get("max_steps")), "started": _num(rec.get("started")), "eta_s": None,
            "loss": _num(rec.get("train_loss_final")), "eval_loss": _num(rec.get("eval_loss_after")),
            "tokens_per_second": _num(rec.get("tokens_per_s")), "queued_at": _num(placement.get("queued_at")),
            "source": "workspace"}


def recorded_runs(workspace: str | os.PathLike) -> dict[str, dict]:
    """{run id: row} for every run record committed to the workspace (runs/<id>/run.json)."""
    root = Path(workspace) / "runs"
    out = {}
    from training.config import RUN_ID

    for rj in sorted(root.glob("*/run.json")) if root.is_dir() else []:
        if not RUN_ID.fullmatch(rj.parent.name) or rj.parent.is_symlink():
            continue
        rec = _load(rj)
        if rec is None:
            continue
        try:
            out[rj.parent.name] = damaged_row(rj.parent.name, rec["_damaged"]) if "_damaged" in rec \
                else row_from_record(rec)
        except (TypeError, AttributeError, KeyError) as exc:  # fields of the wrong type
            out[rj.parent.name] = damaged_row(rj.parent.name, f"{rj}: a field has the wrong type ({exc})")
    return out


def recorded_run(workspace: str | os.PathLike, run_id: str) -> dict | None:
    """A run's committed record and report (None when the workspace has no record of it)."""
    from training.config import PlanError, check_run_id

    try:
        check_run_id(run_id)
    except PlanError:
        return None
    from infra import safe_files

    d = Path(workspace) / "runs" / run_id
    if d.is_symlink():
        return {"record": {"run_id": run_id, "status": "damaged", "error": f"{d}: a symlink; not read"},
                "report": None, "events": [], "damaged": True}
    rec = _load(d / "run.json")
    if rec is None:
        return None
    if "_damaged" in rec:
        return {"record": {"run_id": run_id, "status": "damaged", "error": rec["_damaged"]}, "report": None,
                "events": [], "damaged": True}
    out = {"record": rec, "report": None, "events": [], "damaged": False}
    try:
        out["report"] = safe_files.read_text(d, "report.md")
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        out["report"] = f"(report.md not shown: {exc})"
    try:
        out["events"] = [e for e in safe_files.read_jsonl(d, "events.jsonl") if isinstance(e, dict)]
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        out["events"] = [{"kind": "damaged", "message": str(exc)[:300]}]
    return out


def overview(workspace: str | os.PathLike, scheduler=None, connected: bool = True) -> dict:
    """`duet runs list` and the dashboard's runs table: what the cluster knows (the queue and every
    answering executor, ``roles.client.runs_overview``) over what the workspace recorded; the
    cluster's word wins for a run both know. Newest first."""
    from roles.client import runs_overview

    doc = runs_overview(scheduler) if connected else {"runs": [], "unreachable_executors": []}
    rows = recorded_runs(workspace)
    for r in doc["runs"]:
        base = rows.get(r["run_id"], {})
        rows[r["run_id"]] = {**base, **{k: v for k, v in r.items() if v is not None or k not in base}, "source": "cluster"}
    doc["runs"] = sorted(rows.values(), key=lambda r: -(_num(r.get("started")) or _num(r.get("queued_at")) or 0))
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
    from infra import safe_files

    try:
        doc = safe_files.read_json(workspace, Path("sweeps") / str(sweep_id) / "comparison.json")
        return [str(r["run_id"]) for r in doc.get("rows", []) if r.get("run_id")]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
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
        return call(scheduler, "get", run_id, timeout=30)
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
            return call(scheduler, "cancel", run_id, timeout=CALL_TIMEOUT)
        raise ValueError(f"run {run_id} is queued: `duet runs cancel` it, or wait until it starts")
    if entry and entry["state"] in TERMINAL:
        raise ValueError(f"run {run_id} is {entry['state']}")
    return call(executor, action, run_id, timeout=CALL_TIMEOUT)


def record_state(workspace: str | os.PathLike, run_id: str, entry: dict | None) -> dict:
    """Whether an ended run is in ``workspace`` yet (and what the head's queue says of its record):
    ``in_workspace``, ``state`` (pending, recorded, none, legacy), ``by``, ``commit``, ``path``, ``error``."""
    rec = (entry or {}).get("record") or {}
    here = (Path(workspace) / "runs" / run_id / "run.json").is_file()
    state = rec.get("state", "recorded" if here else "unknown")
    # the executor said it ended; the head's controller notes that within a second: to record, either way
    out = {"in_workspace": here, "state": "pending" if state == "waiting" else state}
    out.update({k: rec[k] for k in ("by", "commit", "path", "workspace", "error", "at") if rec.get(k) is not None})
    if rec.get("claim"):
        out["held_by"] = rec["claim"].get("by")
    return out
