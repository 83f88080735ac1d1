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
    export: dict | None = None   # export options (training/export.py) for the finished run; None: no export
    extra: dict = field(default_factory=dict)


def curate(job: Job, architect, client: bool) -> dict:
    """A dataset version: from the paths (the architect reads them) or uploaded (a Ray client)."""
    if client:
        uploads = {d.name: d.read_bytes() for d in job.data}
        return ray.get(architect.curate_uploaded.remote(uploads, job.dataset_name, job.test_frac, job.seed))
    return ray.get(architect.curate.remote([str(d) for d in job.data], job.dataset_name, job.test_frac, job.seed))


def follow(run_id: str, total: int, executor, architect, reporter: Reporter, scrape: Callable[[], dict]) -> dict:
    """Poll the run until it ends, forwarding its events to the architect (the session log);
    returns the metrics scraped once training was under way."""
    seen, scraped = 0, {}
    with reporter.progress(f"training {run_id}", total) as update:
        while True:
            st = ray.get(executor.status.remote(run_id, seen))
            if st["events"]:
                ray.get(architect.record_run_events.remote(run_id, st["events"]))
                seen = st["events"][-1]["seq"] + 1
            p = st["progress"]
            info = st["state"]
            if p.get("loss") is not None:
                info = f"loss {p['loss']:.3f}" + (f"  {p['tokens_per_second']:.0f} tok/s"
                                                  if p.get("tokens_per_second") else "")
            update(p["step"], info)
            if st["state"] == "training" and p["step"] >= 1 and not scraped:
                scraped = scrape()
            if st["state"] in ("finished", "failed", "cancelled"):
                return scraped
            time.sleep(0.5)


def run_pipeline(job: Job, architect, executor, *, client: bool, reporter: Reporter,
                 scrape: Callable[[], dict], record_here: Callable[[dict], dict] | None = None,
                 started_at: float | None = None) -> dict:
    """Curate, probe, plan (refused with exit 2 when it does not fit), submit, follow, record.
    ``record_here``: also record the run in this host's workspace (a Ray client's own copy);
    ``job.extra`` joins the summary (e.g. the services the caller started)."""
    from training.hardware import HardwareProfile, describe

    t0 = started_at or time.time()
    a_info, e_info = ray.get([architect.ping.remote(), executor.ping.remote()], timeout=120)
    session_id = a_info["session_id"]
    reporter.line("actors", f"architect pid {a_info['pid']}, executor pid {e_info['pid']} "
                            f"(metrics http://127.0.0.1:{e_info['metrics_port']}/metrics), session {session_id}")
    dataset = curate(job, architect, client)
    c, r = dataset["manifest"]["counts"], dataset["manifest"]["reasoning"]
    reporter.line("dataset", f"{job.dataset_name} @ {dataset['content_hash'][:12]}: {c['train']} train / "
                             f"{c['test']} test, {r['reasoning']} reasoning / {r['direct']} direct")
    hw = ray.get(executor.probe.remote())
    reporter.line("executor", f"{hw['hostname']}: {describe(HardwareProfile.from_dict(hw))}")
    with reporter.status(f"preparing model {job.model_ref} (the SmolLM2 GGUF is converted once, then cached)..."):
        model_cfg = ray.get(executor.prepare_model.remote(job.model_ref))
    plan = ray.get(architect.design_plan.remote(job.preset, hw, model_cfg, job.model_ref, dataset, job.overrides))
    reporter.plan(plan)
    est = plan["estimate"]
    if not est["fits"]:
        raise PipelineError(f"the plan does not fit this host: estimate {est['total_bytes'] / 2**30:.2f} GiB of "
                            f"{est['budget_bytes'] / 2**30:.2f} GiB", 2)
    spec = ray.get(architect.submission.remote(plan, dataset))
    run_id = ray.get(executor.submit.remote(spec))
    ray.get(architect.log.remote("state", {"step": "submitted", "run_id": run_id}))
    if job.detach:
        ray.get(architect.commit_session.remote())
        ray.get(architect.close.remote())
        reporter.line("submitted", f"{run_id}; follow it with `duet runs show {run_id}`; stop the services with "
                                   "`duet down` when it is done")
        return {"ok": True, "run_id": run_id, "state": "submitted", "workspace": str(job.workspace),
                "session_id": session_id, "detached": True}
    scraped = follow(run_id, plan["train"]["max_steps"], executor, architect, reporter, scrape)
    final_scrape = scrape()
    files = ray.get(executor.fetch_record.remote(run_id))
    rec = files["_record"]
    recorded = ray.get(architect.record_run.remote(files))
    if record_here is not None:
        recorded = record_here(files)
    exported = None
    if job.export is not None and rec["status"] == "finished":
        with reporter.status("exporting to GGUF (write, then verify against the merged model)..."):
            entry = ray.get(executor.export.remote(run_id, job.export))
        ray.get(architect.record_export.remote(ray.get(executor.fetch_record.remote(run_id)), entry))
        g = entry["files"]["gguf"]
        exported = {"gguf": g["path"], "bytes": g["bytes"], "sha256": g["sha256"], "dir": entry["dir"],
                    "modelfile": entry["files"]["Modelfile"]["path"], "run_it": entry["commands"]["ollama"],
                    "verification": {k: entry["verification"][k] for k in ("top1_agreement", "kl_mean", "prompts")}}
        reporter.line("exported", f"{g['path']} ({g['bytes'] / 2**20:.1f} MiB, {entry['quant']}, verified: top-1 "
                                  f"{entry['verification']['top1_agreement']:.3f}) + Modelfile")
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
        "stores": counts, "hypothesis": hyp and {"id": hyp["id"], "status": hyp["status"]}, "exported": exported,
        **job.extra, "wall_s": round(time.time() - t0, 1),
    }
    reporter.summary(summary, rec)
    return summary
