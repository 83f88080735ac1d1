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
from infra.run_states import ended
from roles import names
from roles.client import call

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
    preset: str = "demo"         # what the training config came from: a preset name or a file's name
    train: object = None         # the TrainConfig (preset + overrides), validated once where submitted
    dataset_name: str = "persona"
    test_frac: float = 0.1
    seed: int = 0
    detach: bool = False
    on: str | None = None        # --on NODE: this executor only
    export: dict | None = None   # export options (training/export/exporter.py) for the finished run; None: no export
    extra: dict = field(default_factory=dict)


def curate(job: Job, architect, client: bool) -> dict:
    """A dataset version: from the paths (the architect reads them) or uploaded (a Ray client)."""
    if client:
        uploads = {d.name: d.read_bytes() for d in job.data}
        return call(architect, "curate_uploaded", uploads, job.dataset_name, job.test_frac, job.seed)
    return call(architect, "curate", [str(d) for d in job.data], job.dataset_name, job.test_frac, job.seed)


LOST_WAIT_S = 6 * 3600  # how long a follower waits for an executor whose node is down


def poll(executor, run_id: str, since: int, lost: dict | None = None) -> dict | None:
    """The run's status, or None while its executor does not answer (RuntimeError after LOST_WAIT_S)."""
    lost = {} if lost is None else lost
    try:
        st = call(executor, "status", run_id, since, timeout=30)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ConnectionError):
        first = lost.setdefault(run_id, time.time())
        if time.time() - first > LOST_WAIT_S:
            raise RuntimeError(f"run {run_id}: its executor has not answered for {LOST_WAIT_S} s") from None
        return None
    lost.pop(run_id, None)
    return st


class Holding:
    """A driver that follows its run holds the right to record it (roles/recorder.py): claimed when the
    run is queued, renewed while it is followed, used once it ends. A driver that detaches, or dies,
    lets the lease lapse, and the recorder of the workspace records the run instead."""

    RENEW_S = 30.0

    def __init__(self, scheduler, run_id: str, workspace: str):
        from roles.recorder import LEASE_S, holder_name

        self.scheduler, self.run_id, self.lease = scheduler, run_id, LEASE_S
        self.by = holder_name("driver", workspace)
        self.held = bool(call(scheduler, "claim", run_id, self.by, self.lease, timeout=60))
        self.renewed = time.time()

    def renew(self) -> None:
        if self.held and time.time() - self.renewed > self.RENEW_S:
            self.held = bool(call(self.scheduler, "claim", self.run_id, self.by, self.lease, timeout=60))
            self.renewed = time.time()

    def release(self) -> None:
        call(self.scheduler, "unclaim", self.run_id, self.by, timeout=60)

    def record(self, architect, files: dict, wait_s: float = 600) -> dict:
        """Record the ended run through ``architect`` when this driver holds it, else wait for whoever
        does (the recorder took it over): {"path", "commit", ...} either way."""
        if call(self.scheduler, "claim", self.run_id, self.by, self.lease, timeout=60):
            try:
                out = call(architect, "record_run", files, timeout=600)
            except Exception as exc:
                call(self.scheduler, "unclaim", self.run_id, self.by, f"{type(exc).__name__}: {exc}", timeout=60)
                raise
            a = call(architect, "ping", timeout=60)
            call(self.scheduler, "recorded", self.run_id, self.by, {"path": out["path"], "commit": out["commit"],
                                                                    "workspace": a["workspace"],
                                                                    "session_id": a["session_id"]}, timeout=60)
            return out
        deadline = time.time() + wait_s
        while time.time() < deadline:
            rec = call(self.scheduler, "get", self.run_id, timeout=60)["record"]
            if rec["state"] == "recorded":
                return {"path": rec.get("path"), "commit": rec.get("commit"), "by": rec.get("by")}
            time.sleep(1)
        raise PipelineError(f"run {self.run_id} ended, but its record was not written within {wait_s:.0f} s "
                            f"(held by another; `duet runs show {self.run_id}` says by whom)", 3)


def follow(run_id: str, total: int, executor, architect, reporter: Reporter, scrape: Callable[[], dict],
           holding: Holding | None = None) -> dict:
    """Poll the run until it ends, forwarding its events to the architect (the session log) and
    renewing the driver's hold on its record; returns the metrics scraped once training was under way."""
    seen, scraped, lost, step = 0, {}, {}, 0
    with reporter.progress(f"training {run_id}", total) as update:
        while True:
            if holding is not None:
                holding.renew()
            st = poll(executor, run_id, seen, lost)
            if st is None:  # its node is down: the run resumes there when the node rejoins
                update(step, "executor unreachable (node down?); waiting for it to rejoin")
                time.sleep(2)
                continue
            if st["events"]:
                call(architect, "record_run_events", run_id, st["events"])
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
            if ended(st["state"]):
                return scraped
            time.sleep(0.5)


def plan_run(job: Job, architect, infos: dict, dataset: dict, reporter: Reporter,
             train=None) -> tuple[dict, str]:
    """One plan per executor (``job.on``: that one only) for ``train`` (a sweep point's config; default
    the job's); shows the best and why the others refuse."""
    from roles import placement
    from roles.queue import free_bytes
    from training.plan.hardware import HardwareProfile, describe

    for i in infos.values():
        reporter.line("executor", f"{i['node']} {i['hardware']['hostname']}: "
                                  f"{describe(HardwareProfile.from_dict(i['hardware']))}")
    train = train or job.train
    run_id = call(architect, "new_run_id", train.name)
    with reporter.status(f"preparing model {job.model_ref} on {len(infos)} executor(s) (converted once, then cached)..."):
        plans, refused = placement.plan_everywhere(architect, infos, train=train, preset=job.preset,
                                                   model_ref=job.model_ref, dataset=dataset, run_id=run_id, on=job.on)
    best = max(plans, key=lambda n: free_bytes(infos[n]["hardware"]))
    reporter.plan(plans[best])
    for n, p in refused.items():
        reporter.note(f"does not fit {infos[n]['node']}: {placement.breakdown(p)}")
    return plans, run_id


def export_run(job: Job, run_id: str, executor, architect, reporter: Reporter) -> dict:
    """Export the finished run on its executor (training/export/exporter.py) and record the export."""
    with reporter.status("exporting to GGUF (write, then verify against the merged model)..."):
        entry = call(executor, "export", run_id, job.export)
    call(architect, "record_export", call(executor, "fetch_record", run_id), entry)
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
    a_info = call(architect, "ping", timeout=120)
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
                                  pinned=placement.resolve_on(job.on, infos) if job.on else None, title=job.dataset_name,
                                  session_id=session_id, workspace=a_info["workspace"])
    except placement.PlacementError as exc:
        raise PipelineError(str(exc), exc.code) from exc
    holding = None if job.detach else Holding(scheduler, run_id, a_info["workspace"])
    call(architect, "log", "state", {"step": "queued", "run_id": run_id, "fits_on": entry["fits_on"]})
    with reporter.status(f"{run_id} is queued; waiting for an idle executor it fits..."):
        placed = placement.wait_placed(scheduler, run_id, timeout=15 if job.detach else None)
    if placed["state"] == "queued":  # detached, and every executor it fits is busy: the head starts it later
        call(architect, "commit_session")
        call(architect, "close")
        reporter.line("queued", f"{run_id}: the executors it fits ({', '.join(entry['fits_on'])}) are busy; the head "
                                f"starts it when one is idle; `duet runs list` shows the queue")
        return {"ok": True, "run_id": run_id, "state": "queued", "workspace": str(job.workspace),
                "session_id": session_id, "detached": True}
    if placed["executor"] is None:
        raise PipelineError(f"run {run_id} {placed['state']} before it started: {placed.get('error')}", 1)
    executor = ray.get_actor(placed["executor"], namespace=names.NAMESPACE)
    try:
        return _follow_and_record(job, run_id, executor, placed, plans, dataset, architect, holding, session_id,
                                  reporter=reporter, scrape=scrape, record_here=record_here, t0=t0)
    except BaseException:
        if holding is not None:  # this driver stops following: the recorder records the run when it ends
            with contextlib.suppress(Exception):
                holding.release()
        raise


def _follow_and_record(job: Job, run_id: str, executor, placed: dict, plans: dict, dataset: dict, architect,
                       holding: Holding | None, session_id: str, *, reporter: Reporter, scrape, record_here,
                       t0: float) -> dict:
    """Follow the placed run to its end (or hand it over: --detach), record it, export it, sum it up."""
    plan = call(architect, "record_plan", plans[placed["executor"]])  # the config that runs, committed
    call(architect, "log", "state", {"step": "submitted", "run_id": run_id, "executor": placed["executor"],
                                           "node": placed["node"]})
    reporter.line("submitted", f"{run_id} on {names.node_of(placed['executor'])} ({placed['node'].get('ip')}, "
                               f"{placed['node'].get('host')})")
    if job.detach:
        call(architect, "commit_session")
        call(architect, "close")
        reporter.line("detached", f"follow it with `duet runs show {run_id}`; stop the services with "
                                  "`duet down` when it is done")
        return {"ok": True, "run_id": run_id, "state": "submitted", "workspace": str(job.workspace),
                "session_id": session_id, "detached": True, "executor": placed["executor"]}
    scraped = follow(run_id, plan["train"]["max_steps"], executor, architect, reporter, lambda: scrape(executor),
                     holding)
    final_scrape = scrape(executor)
    files = call(executor, "fetch_record", run_id)
    rec = files["_record"]
    recorded = holding.record(architect, files)
    mine = "by" not in recorded  # this driver recorded it (else the recorder did, hypothesis included)
    if record_here is not None:
        recorded = record_here(files)
    exported = export_run(job, run_id, executor, architect, reporter) if job.export is not None and \
        rec["status"] == "finished" else None
    hyp = call(architect, "hypothesis_from_run", rec) if rec["status"] == "finished" and mine else None
    call(architect, "commit_session")
    counts = call(architect, "store_counts")
    call(architect, "close")
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
