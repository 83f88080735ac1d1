"""The ``duet run`` pipeline through the two actors: curate -> probe -> plan -> submit -> follow ->
record. The caller (cluster/demo.py) brings up or joins the cluster and hands over the actors;
what a person sees goes through a ``Reporter`` (the CLI's is Rich, cluster/console.py; tests and
programs pass ``QuietReporter``). No Rich here, no node lifecycle.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Protocol
from infra.lazy import lazy
from roles import names

ray = lazy("ray", extra="architect")


class PipelineError(RuntimeError):
    """A refusal or failure with the CLI's exit code (1 input, 2 refused, 3 infrastructure)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Reporter(Protocol):
    def heading(self, title: str) -> None:
        """The job's title."""

    def note(self, text: str) -> None:
        """A side remark (what was stopped, reused)."""

    def line(self, kind: str, text: str) -> None:
        """One finished step: ``kind`` (cluster, actors, dataset, ...) and what it did."""

    def status(self, text: str) -> ContextManager:
        """A wait of unknown length."""

    def plan(self, plan: dict) -> None:
        """The plan with its memory breakdown and verdict."""

    def progress(self, description: str, total: int) -> ContextManager[Callable[[int, str], None]]:
        """A bar; the context gives ``update(completed, info)``."""

    def summary(self, summary: dict, record: dict) -> None:
        """The finished run."""


class QuietReporter:
    def heading(self, title: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def line(self, kind: str, text: str) -> None:
        pass

    def status(self, text: str) -> ContextManager:
        return contextlib.nullcontext()

    def plan(self, plan: dict) -> None:
        pass

    def progress(self, description: str, total: int) -> ContextManager[Callable[[int, str], None]]:
        return contextlib.nullcontext(lambda completed, info: None)

    def summary(self, summary: dict, record: dict) -> None:
        pass


@dataclass
class Job:
    """What to run: the data, the model, the preset and overrides, the dataset's name and split."""

    workspace: Path
    data: list[Path]
    model_ref: str
    preset: str = "demo"
    overrides: dict | None = None
    dataset_name: str = "persona"
    test_frac: float = 0.1
    seed: int = 0
    detach: bool = False
    on: str | None = None        # --on NODE: this executor only
    export: dict | None = None   # export options (training/export.py) for the finished run; None: no export
    extra: dict = field(default_factory=dict)


def curate(job: Job, architect, client: bool) -> dict:
    """A dataset version: from the paths (the architect reads them) or uploaded (a Ray client)."""
    if client:
        uploads = {d.name: d.read_bytes() for d in job.data}
        return ray.get(architect.curate_uploaded.remote(uploads, job.dataset_name, job.test_frac, job.seed))
    return ray.get(architect.curate.remote([str(d) for d in job.data], job.dataset_name, job.test_frac, job.seed))


LOST_WAIT_S = 6 * 3600  # how long a follower waits for an executor whose node is down


def poll(executor, run_id: str, since: int, lost: dict | None = None) -> dict | None:
    """The run's status, or None while its executor does not answer (RuntimeError after LOST_WAIT_S)."""
    lost = {} if lost is None else lost
    try:
        st = ray.get(executor.status.remote(run_id, since), timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ConnectionError):
        first = lost.setdefault(run_id, time.time())
        if time.time() - first > LOST_WAIT_S:
            raise RuntimeError(f"run {run_id}: its executor has not answered for {LOST_WAIT_S} s") from None
        return None
    lost.pop(run_id, None)
    return st


def follow(run_id: str, total: int, executor, architect, reporter: Reporter, scrape: Callable[[], dict]) -> dict:
    """Poll the run until it ends, forwarding its events to the architect (the session log);
    returns the metrics scraped once training was under way."""
    seen, scraped, lost, step = 0, {}, {}, 0
    with reporter.progress(f"training {run_id}", total) as update:
        while True:
            st = poll(executor, run_id, seen, lost)
            if st is None:  # its node is down: the run resumes there when the node rejoins
                update(step, "executor unreachable (node down?); waiting for it to rejoin")
                time.sleep(2)
                continue
            if st["events"]:
                ray.get(architect.record_run_events.remote(run_id, st["events"]))
                seen = st["events"][-1]["seq"] + 1
            p = st["progress"]
            info = st["state"]
            if p.get("loss") is not None:
                info = f"loss {p['loss']:.3f}" + (f"  {p['tokens_per_second']:.0f} tok/s"
                                                  if p.get("tokens_per_second") else "")
            step = p["step"]
            update(step, info)
            if st["state"] == "training" and p["step"] >= 1 and not scraped:
                scraped = scrape()
            if st["state"] in ("finished", "failed", "cancelled"):
                return scraped
            time.sleep(0.5)


def plan_run(job: Job, architect, infos: dict, dataset: dict, reporter: Reporter,
             overrides: dict | None = None) -> tuple[dict, str]:
    """One plan per executor (``job.on``: that one only); shows the best and why the others refuse."""
    from roles import placement
    from roles.queue import free_bytes
    from training.hardware import HardwareProfile, describe

    for i in infos.values():
        reporter.line("executor", f"{i['node']} {i['hardware']['hostname']}: "
                                  f"{describe(HardwareProfile.from_dict(i['hardware']))}")
    run_id = ray.get(architect.new_run_id.remote(job_name(job.preset, overrides or job.overrides)))
    with reporter.status(f"preparing model {job.model_ref} on {len(infos)} executor(s) (converted once, then cached)..."):
        plans, refused = placement.plan_everywhere(architect, infos, preset=job.preset, model_ref=job.model_ref,
                                                   dataset=dataset, overrides=overrides or job.overrides,
                                                   run_id=run_id, on=job.on)
    best = max(plans, key=lambda n: free_bytes(infos[n]["hardware"]))
    reporter.plan(plans[best])
    for n, p in refused.items():
        reporter.note(f"does not fit {infos[n]['node']}: {placement.breakdown(p)}")
    return plans, run_id


def job_name(preset: str, overrides: dict | None) -> str:
    from training.config import load_config

    return load_config(preset, overrides).name


def export_run(job: Job, run_id: str, executor, architect, reporter: Reporter) -> dict:
    """Export the finished run on its executor (training/export.py) and record the export."""
    with reporter.status("exporting to GGUF (write, then verify against the merged model)..."):
        entry = ray.get(executor.export.remote(run_id, job.export))
    ray.get(architect.record_export.remote(ray.get(executor.fetch_record.remote(run_id)), entry))
    g = entry["files"]["gguf"]
    v = entry["verification"]
    reporter.line("exported", f"{g['path']} ({g['bytes'] / 2**20:.1f} MiB, {entry['quant']}; checked by {v['judge']}: "
                              f"top-1 {v['top1_agreement']:.3f}) + Modelfile")
    return {"gguf": g["path"], "bytes": g["bytes"], "sha256": g["sha256"], "dir": entry["dir"],
            "modelfile": entry["files"]["Modelfile"]["path"], "run_it": entry["commands"]["ollama"],
            "verification": {k: v[k] for k in ("judge", "top1_agreement", "top1_exact", "kl_mean", "prompts", "greedy",
                                               "chat_template_equal", "lora") if k in v}}


def run_pipeline(job: Job, architect, scheduler, *, client: bool, reporter: Reporter,
                 scrape: Callable[[object], dict], record_here: Callable[[dict], dict] | None = None,
                 started_at: float | None = None) -> dict:
    """Curate, plan for every executor (refused with exit 2 when it fits none), queue, follow where
    the scheduler placed it, record. ``scrape(executor)``: that executor's metrics.
    ``record_here``: also record the run in this host's workspace (a Ray client's own copy);
    ``job.extra`` joins the summary (e.g. the services the caller started)."""
    from roles import placement

    t0 = started_at or time.time()
    a_info = ray.get(architect.ping.remote(), timeout=120)
    session_id = a_info["session_id"]
    try:
        infos = placement.executors_info()
        reporter.line("actors", f"architect pid {a_info['pid']}, executor(s) " + ", ".join(
            f"{i['node']} pid {i['ping']['pid']} (metrics port {i['ping']['metrics_port']})" for i in infos.values())
            + f", session {session_id}")
        dataset = curate(job, architect, client)
        c, r = dataset["manifest"]["counts"], dataset["manifest"]["reasoning"]
        reporter.line("dataset", f"{job.dataset_name} @ {dataset['content_hash'][:12]}: {c['train']} train / "
                                 f"{c['test']} test, {r['reasoning']} reasoning / {r['direct']} direct")
        plans, run_id = plan_run(job, architect, infos, dataset, reporter)
        entry = placement.enqueue(scheduler, architect, run_id, plans, dataset=dataset,
                                  pinned=placement.resolve_on(job.on, infos) if job.on else None, title=job.dataset_name)
    except placement.PlacementError as exc:
        raise PipelineError(str(exc), exc.code) from exc
    ray.get(architect.log.remote("state", {"step": "queued", "run_id": run_id, "fits_on": entry["fits_on"]}))
    with reporter.status(f"{run_id} is queued; waiting for an idle executor it fits..."):
        placed = placement.wait_placed(scheduler, run_id, timeout=15 if job.detach else None)
    if placed["state"] == "queued":  # detached, and every executor it fits is busy: the head starts it later
        ray.get(architect.commit_session.remote())
        ray.get(architect.close.remote())
        reporter.line("queued", f"{run_id}: the executors it fits ({', '.join(entry['fits_on'])}) are busy; the head "
                                f"starts it when one is idle; `duet runs list` shows the queue")
        return {"ok": True, "run_id": run_id, "state": "queued", "workspace": str(job.workspace),
                "session_id": session_id, "detached": True}
    if placed["executor"] is None:
        raise PipelineError(f"run {run_id} {placed['state']} before it started: {placed.get('error')}", 1)
    executor = ray.get_actor(placed["executor"], namespace=names.NAMESPACE)
    plan = ray.get(architect.record_plan.remote(plans[placed["executor"]]))  # the config that runs, committed
    ray.get(architect.log.remote("state", {"step": "submitted", "run_id": run_id, "executor": placed["executor"],
                                           "node": placed["node"]}))
    reporter.line("submitted", f"{run_id} on {names.node_of(placed['executor'])} ({placed['node'].get('ip')}, "
                               f"{placed['node'].get('host')})")
    if job.detach:
        ray.get(architect.commit_session.remote())
        ray.get(architect.close.remote())
        reporter.line("detached", f"follow it with `duet runs show {run_id}`; stop the services with "
                                  "`duet down` when it is done")
        return {"ok": True, "run_id": run_id, "state": "submitted", "workspace": str(job.workspace),
                "session_id": session_id, "detached": True, "executor": placed["executor"]}
    scraped = follow(run_id, plan["train"]["max_steps"], executor, architect, reporter, lambda: scrape(executor))
    final_scrape = scrape(executor)
    files = ray.get(executor.fetch_record.remote(run_id))
    rec = files["_record"]
    recorded = ray.get(architect.record_run.remote(files))
    if record_here is not None:
        recorded = record_here(files)
    exported = export_run(job, run_id, executor, architect, reporter) if job.export is not None and \
        rec["status"] == "finished" else None
    hyp = ray.get(architect.hypothesis_from_run.remote(rec)) if rec["status"] == "finished" else None
    ray.get(architect.commit_session.remote())
    counts = ray.get(architect.store_counts.remote())
    ray.get(architect.close.remote())
    if rec["status"] != "finished":
        raise PipelineError(f"run {run_id} {rec['status']}: {rec.get('error')}", 1)
    summary = {
        "ok": True, "run_id": run_id, "workspace": str(job.workspace), "session_id": session_id,
        "model": job.model_ref, "dataset": {"name": job.dataset_name, "content_hash": dataset["content_hash"],
                                            "path": dataset["path"]},
        "eval_loss_before": rec["eval_loss_before"], "eval_loss_after": rec["eval_loss_after"],
        "steps": rec["steps"], "train_s": rec["train_s"], "tokens_per_s": rec["tokens_per_s"],
        "run_dir": recorded["path"], "report": str(Path(recorded["path"]) / "report.md"),
        "run_commit": recorded.get("commit"), "metrics_during_training": scraped, "metrics_final": final_scrape,
        "executor": placed["executor"], "placement": rec.get("placement"), "stores": counts, "hypothesis": hyp and {"id": hyp["id"], "status": hyp["status"]}, "exported": exported,
        **job.extra, "wall_s": round(time.time() - t0, 1),
    }
    reporter.summary(summary, rec)
    return summary
