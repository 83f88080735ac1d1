"""A sweep's runs through the queue: one dataset version, every grid point planned for every
executor, all queued in one group (at most ``max_parallel`` at a time), followed together until the
last one ends, each recorded as it ends. The comparison is the caller's (roles/sweep.compare).

A run whose executor stops answering (its node died) is waited for: the executor resumes it from its
newest valid checkpoint when the node rejoins; the other runs go on meanwhile.
"""

from __future__ import annotations

import time
from typing import Callable

from infra.lazy import lazy
from roles import names, placement
from roles.client import call
from roles.pipeline import Holding, Job, PipelineError, Reporter, curate, plan_run, poll
from roles.queue import TERMINAL

ray = lazy("ray", extra="architect")


def run_sweep_pipeline(job: Job, points: list[dict], sweep_id: str, max_parallel: int, architect, scheduler, *,
                       client: bool, reporter: Reporter, record_here: Callable[[dict], dict] | None = None) -> list[dict]:
    """[{"point", "run_id", "record"}] in grid order, or {"point", "run_id", "status": "failed", "error"}
    for a point that was refused or could not start."""
    try:
        infos = placement.executors_info()
    except placement.PlacementError as exc:
        raise PipelineError(str(exc), exc.code) from exc
    pinned = placement.resolve_on(job.on, infos) if job.on else None
    reporter.line("executors", ", ".join(f"{i['node']} ({i['ping'].get('ip')})" for i in infos.values())
                  + f"; at most {max_parallel} run(s) at a time")
    a_info = call(architect, "ping", timeout=120)
    dataset = curate(job, architect, client)
    reporter.line("dataset", f"{job.dataset_name} @ {dataset['content_hash'][:12]} (one version for every run)")
    results: dict[int, dict] = {}
    active: dict[str, dict] = {}
    for i, pt in enumerate(points):
        label = ", ".join(f"{k}={v}" for k, v in pt["point"].items())
        try:
            plans, run_id = plan_run(job, architect, infos, dataset, reporter, train=pt["train"])
            placement.enqueue(scheduler, architect, run_id, plans, dataset=dataset, pinned=pinned, group=sweep_id,
                              max_parallel=max_parallel, title=f"sweep {sweep_id}: {label}",
                              session_id=a_info["session_id"], workspace=a_info["workspace"])
        except placement.PlacementError as exc:
            results[i] = {"point": pt["point"], "run_id": None, "status": "failed",
                          "error": f"run {i + 1}/{len(points)} ({label}): {exc}"}
            continue
        active[run_id] = {"i": i, "point": pt["point"], "label": label, "plans": plans, "seen": 0, "handle": None,
                          "holding": Holding(scheduler, run_id, a_info["workspace"])}
    call(architect, "log", "state", {"step": "sweep queued", "sweep_id": sweep_id, "runs": list(active)})
    total = sum(p["overrides"].get("max_steps") or 0 for p in points) or len(points)
    lost: dict = {}
    with reporter.progress(f"sweep {sweep_id}", total) as update:
        done_steps: dict[str, int] = {}
        while active:
            for run_id, a in list(active.items()):
                a["holding"].renew()
                if a["handle"] is None:
                    where = _placed(run_id, a, scheduler, architect, reporter, results)
                    if where == "ended":
                        active.pop(run_id)
                    if where != "placed":
                        continue
                st = poll(a["handle"], run_id, a["seen"], lost)
                if st is None:
                    continue
                if st["events"]:
                    call(architect, "record_run_events", run_id, st["events"])
                    a["seen"] = st["events"][-1]["seq"] + 1
                done_steps[run_id] = st["progress"]["step"]
                if st["state"] in TERMINAL:
                    results[a["i"]] = _record(run_id, a, architect, record_here, reporter)
                    active.pop(run_id)
            running = sum(1 for a in active.values() if a["handle"] is not None)
            update(sum(done_steps.values()), f"{running} running, {len(active) - running} queued, "
                                             f"{len(results)} done" + (f", {len(lost)} unreachable" if lost else ""))
            if active:
                time.sleep(0.5)
    call(architect, "commit_session")
    return [results[i] for i in sorted(results)]


def _placed(run_id: str, a: dict, scheduler, architect, reporter: Reporter, results: dict) -> str:
    """"placed" once the scheduler started the run (its config is committed then), "queued" before;
    "ended" for a run that ended in the queue (cancelled, or it could not start: into ``results``)."""
    e = call(scheduler, "get", run_id, timeout=60)
    if e["state"] == "queued":
        return "queued"
    if e["executor"] is None:
        results[a["i"]] = {"point": a["point"], "run_id": run_id, "status": e["state"],
                           "error": f"{run_id} ({a['label']}): {e.get('error')}"}
        return "ended"
    a["handle"] = ray.get_actor(e["executor"], namespace=names.NAMESPACE)
    call(architect, "record_plan", a["plans"][e["executor"]])
    reporter.line("started", f"{run_id} ({a['label']}) on {names.node_of(e['executor'])} ({(e['node'] or {}).get('ip')})")
    return "placed"


def _record(run_id: str, a: dict, architect, record_here, reporter: Reporter) -> dict:
    files = call(a["handle"], "fetch_record", run_id, timeout=120)
    rec = files["_record"]
    mine = "by" not in a["holding"].record(architect, files)  # else the recorder did, hypothesis included
    if record_here is not None:
        record_here(files)
    if rec["status"] == "finished" and mine:
        call(architect, "hypothesis_from_run", rec)
    reporter.line("run recorded", f"{run_id} ({a['label']}): {rec['status']}"
                  + (f", eval loss {rec['eval_loss_after']:.4f}" if rec.get("eval_loss_after") is not None else ""))
    out = {"point": a["point"], "run_id": run_id, "record": rec}
    if rec["status"] != "finished":
        out.update(status=rec["status"], error=f"{run_id} ({a['label']}) {rec['status']}: {rec.get('error')}")
    return out
