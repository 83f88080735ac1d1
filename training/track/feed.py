"""What a run tells its trackers, read from the run's folder (training/run/engine.py's files), the same
for every tracker: steps (losses.jsonl), evaluations and recoveries (events.jsonl), the plan and its
provenance as parameters (spec.json / run.json), and, once the run has ended, the final record and its
artifacts (report.md, loss.png, plan.json). Exports arrive later, as run.json's ``exported`` grows.

Each tracker keeps a cursor in ``tracking/<tracker>.json``: byte offsets into the append-only logs and
what was already sent, so a follower that restarts (or a resumed run) continues where the last left off.
Only whole lines are read: a line still being written waits for the next pass.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from infra.run_states import TERMINAL
from training.run import run_files

RECOVERY_EVENTS = ("oom", "rollback", "resume", "memory_capped", "thermal_pause", "fault_injected")
STEP_KEYS = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
             "tokens_per_second": "train/tokens_per_second", "rss_bytes": "memory/rss_bytes",
             "gpu_process_memory_bytes": "memory/gpu_process_bytes", "gpu_memory_used_bytes": "memory/gpu_used_bytes",
             "gpu_temperature_c": "gpu/temperature_c"}


def tail(path: Path, offset: int, limit: int = 4 << 20) -> tuple[list[dict], int]:
    """The whole JSON lines of ``path`` after byte ``offset`` (at most ``limit`` bytes) and the offset after them."""
    try:
        with open(path, "rb") as fh:
            if offset > os.fstat(fh.fileno()).st_size:
                offset = 0  # the file was replaced (a run moved back to a copy): read it again, trackers take repeats
            fh.seek(offset)
            data = fh.read(limit)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn line from a killed writer: losses.jsonl's readers skip it too
    return rows, offset + end + 1


def step_metrics(entry: dict) -> dict[str, float]:
    """A logged step's numbers under the trackers' names."""
    out = {}
    for key, name in STEP_KEYS.items():
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys and short string values (trackers' parameters are flat strings)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and any(isinstance(x, (dict, list)) for x in obj):
        out[prefix[:-1]] = json.dumps(obj, default=str)[:500]
    else:
        out[prefix[:-1]] = (json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj))[:500]
    return out


def _spec_plan(run_dir: Path) -> tuple[dict, dict]:
    """The run's submission (spec.json) and its plan, whose training config loses the tracking settings
    (``report_to`` and ``tracking``: where the run reports, not what it is)."""
    spec = run_files.read_json(run_dir / "spec.json", {}) or {}
    plan = dict(spec.get("plan") or {})
    plan["train"] = {k: v for k, v in (plan.get("train") or {}).items() if k not in ("report_to", "tracking")}
    return spec, plan


def params(run_dir: Path) -> dict[str, str]:
    """The run's parameters: the planned training config, the plan's device, dtype and memory estimate, the
    dataset's name and content hash, the model, duet's code SHA, the run and sweep ids."""
    spec, plan = _spec_plan(run_dir)
    est, ds = plan.get("estimate") or {}, spec.get("dataset") or {}
    out = {**flatten(plan["train"], "train."),
           "plan.device": str(plan.get("device")), "plan.dtype": str(plan.get("dtype")),
           "plan.estimate_bytes": str(est.get("total_bytes")), "plan.budget_bytes": str(est.get("budget_bytes")),
           "dataset.name": str(ds.get("name")), "dataset.content_hash": str(ds.get("content_hash")),
           "model": str(spec.get("model_ref")), "duet.run_id": run_dir.name, "duet.code_sha": run_files.code_sha(),
           "duet.sweep_id": str(group(spec) or "")}
    return {k: v for k, v in out.items() if v not in ("None", "")}


def group(spec: dict) -> str | None:
    """The sweep a run belongs to (the scheduler's group, in the spec's placement), or None."""
    return (spec.get("placement") or {}).get("group")


def plan_document(run_dir: Path) -> dict:
    """plan.json: the whole plan with its decisions (too long for a tracker's parameters)."""
    return _spec_plan(run_dir)[1]


def event_item(ev: dict) -> tuple[str, int, dict] | None:
    """An event the trackers carry: ("metrics", step, {...}) for an evaluation, ("recovery", step, {...})
    for an OOM re-plan, a rollback, a resume and their kin; None for the rest."""
    kind, step = ev.get("event"), ev.get("step")
    if kind == "eval" and isinstance(ev.get("eval_loss"), (int, float)):
        which = ev.get("which") or ""
        name = {"before": "eval/loss_before", "after": "eval/loss_after"}.get(which, "eval/loss")
        return "metrics", int(step or 0), {name: float(ev["eval_loss"])}
    if kind in RECOVERY_EVENTS:
        detail = {k: v for k, v in ev.items() if k not in ("seq", "run_id", "event", "traceback")}
        return "recovery", int(step or 0), {"kind": kind, "time": ev.get("time"), "detail": detail}
    return None


def final(run_dir: Path) -> dict | None:
    """The ended run's record for the trackers: its status, final metrics and artifacts; None while it runs."""
    rec = run_files.read_json(run_dir / "run.json", {}) or {}
    status = rec.get("status")
    if status not in TERMINAL:
        return None
    metrics = {}
    for key, name in (("eval_loss_before", "final/eval_loss_before"), ("eval_loss_after", "final/eval_loss_after"),
                      ("wall_s", "final/wall_s"), ("peak_memory", "final/peak_memory_bytes")):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[name] = float(v)
    for phase, row in (rec.get("phases") or {}).items():
        for key in ("measured_bytes", "estimate_bytes", "ratio_estimate_to_measured"):
            if isinstance(row, dict) and isinstance(row.get(key), (int, float)):
                metrics[f"memory/{phase}_{key}"] = float(row[key])
    metrics["final/recoveries"] = float(len(rec.get("recoveries") or []))
    arts = [p for p in (run_dir / "report.md", run_dir / "loss.png") if p.is_file()]
    return {"status": status, "error": rec.get("error"), "metrics": metrics, "artifacts": arts,
            "steps": max([x.get("step", 0) for x in rec.get("losses") or []] or [0])}


def exports(run_dir: Path) -> list[dict]:
    """The run's exports so far (run.json ``exported``, one entry per output path, a re-export replacing
    its entry): what it is, its files, its verification, when."""
    rec = run_files.read_json(run_dir / "run.json", {}) or {}
    out = []
    for e in rec.get("exported") or []:
        files = {k: {"path": f.get("path"), "bytes": f.get("bytes"), "sha256": f.get("sha256")}
                 for k, f in (e.get("files") or {}).items() if isinstance(f, dict)}
        out.append({"to": e.get("to"), "quant": e.get("quant"), "name": e.get("name"), "files": files,
                    "verification": e.get("verification"), "time": e.get("time")})
    return out
