"""``duet demo``: the whole coordinated fine-tune on one machine, on real parts.

The driver only orchestrates: the ArchitectActor curates, plans and records; the ExecutorActor
probes, trains, merges and evaluates; both talk to real Postgres / Mongo-wire / Ray processes.
Services the demo started itself are stopped at the end; services from ``duet up`` are reused
and left running.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from cluster import embedded, node
from infra import services

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "examples" / "persona" / "persona.jsonl"
METRICS_PORTS = range(9108, 9158)
SCRAPED = ("duet_train_step", "duet_train_loss", "duet_train_tokens_per_second", "duet_train_learning_rate",
           "duet_train_grad_norm", "duet_process_resident_memory_peak_bytes", "duet_eval_loss")


class DemoError(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def scrape(port: int | None, text: str | None = None) -> dict:
    """Read the executor's exporter over HTTP (or parse ``text``, the exposition the executor actor
    returned when its exporter is on another host's loopback): {metric name: value} for the demo."""
    from prometheus_client.parser import text_string_to_metric_families

    if text is None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in SCRAPED:
                out[s.name] = s.value
    return out


def precheck(data: Path, workspace: Path | None = None) -> None:
    """Fail fast, before any service starts, on a dataset that would not curate: not a JSONL file,
    invalid records (exit 1), or a secret in it (exit 2)."""
    from memory_sync.secret_scan import SecretFound, scanner
    from training.dataset import DatasetError, check_records, input_file, scan_jsonl

    try:
        found = scanner(workspace).scan_file(input_file(data))
        if found:
            raise SecretFound(found, action=f"refusing {data}")
        records, line_problems = scan_jsonl(data)  # every problem at once: lines that are no JSON object, records
        problems = sorted(line_problems + check_records(records), key=lambda p: p.line)
    except DatasetError as exc:
        raise DemoError(str(exc), 1) from exc
    except SecretFound as exc:
        raise DemoError(str(exc), 2) from exc
    if problems:
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DemoError(f"{data}: {len(problems)} problem(s); nothing was written:\n{lines}{more}", 1)


def run_demo(workspace: str, *, model: str | None = None, tiny: bool = False, data: str | None = None,
             console=None, quiet: bool = False, max_steps: int | None = None) -> dict:
    """The main job: the persona examples, the demo preset, SmolLM2 (or --tiny / --model)."""
    return run_pipeline(workspace, model=model, tiny=tiny, data=[data] if data else None, console=console,
                        quiet=quiet, overrides={"max_steps": max_steps} if max_steps is not None else None,
                        preset="demo", dataset_name="persona", title="duet demo")


def run_pipeline(workspace: str, *, model: str | None = None, tiny: bool = False, data: list[str] | None = None,
                 console=None, quiet: bool = False, overrides: dict | None = None, preset: str = "demo",
                 dataset_name: str = "persona", title: str = "duet run", detach: bool = False,
                 test_frac: float = 0.1, seed: int = 0, address: str | None = None) -> dict:
    """Curate -> probe -> plan -> submit -> follow -> record, through the actors.

    ``detach``: return once the executor accepted the run; the run goes on without this driver
    (and the services stay up); ``duet runs show ID`` picks up the record later.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    con = console or Console(stderr=True, quiet=quiet, soft_wrap=True)
    t0 = time.time()
    data_paths = [Path(d) for d in data] if data else [DEFAULT_DATA]
    if model:
        from training.models import ModelError, resolve

        try:
            resolve(model)
        except ModelError as exc:
            raise DemoError(str(exc), 1) from exc
        model_ref = str(Path(model).expanduser().resolve())
    else:
        model_ref = "tiny" if tiny else "smollm2"
    ws = Path(workspace).resolve()
    for d in data_paths:
        precheck(d, ws)

    from cluster import auth

    auth.apply_auth_env()  # before ray is imported: Ray reads RAY_AUTH_MODE at import
    con.rule(f"[bold]{title}")
    try:
        if address:  # a two-host cluster: use it as it is; stores by URL (or none: the outbox keeps writes)
            import os

            emb = embedded.Embedded(ws, address, os.environ.get("DUET_POSTGRES_URL"), os.environ.get("DUET_MONGO_URL"), [])
        else:
            with con.status("starting the embedded cluster (Ray, PostgreSQL, Mongo-wire)..."):
                emb = embedded.up(ws)
    except services.ServiceError as exc:
        raise DemoError(f"infrastructure unavailable: {exc}", 3) from exc
    con.print(f"[green]cluster[/] Ray {emb.ray_address} (token auth), Postgres {services.display_url(emb.postgres_url)}, "
              f"Mongo {emb.mongo_url}" + (f"  [dim](started: {', '.join(emb.started)})[/]" if emb.started else
                                          "  [dim](reused)[/]"))
    import ray

    from roles.actors import architect_actor, executor_actor

    executor = None
    try:
        node.connect(emb.ray_address)
        port = services.free_port(METRICS_PORTS)
        executor = executor_actor(str(ws / ".duet" / "executor"), port)
        client = node.is_client(emb.ray_address)
        if client:  # no node here: the architect runs on the head, in a workspace there; data is uploaded
            e_info = ray.get(executor.ping.remote(), timeout=120)
            head_ws = str(Path(e_info["data_dir"]).parent / "client-workspaces" / ws.name)
            architect = architect_actor(head_ws, emb.postgres_url, emb.mongo_url, title, on_node=e_info["node_id"])
        else:
            architect = architect_actor(str(ws), emb.postgres_url, emb.mongo_url, title)
        a_info, e_info = ray.get([architect.ping.remote(), executor.ping.remote()], timeout=120)
        session_id = a_info["session_id"]
        con.print(f"[green]actors[/] architect pid {a_info['pid']}, executor pid {e_info['pid']} "
                  f"(metrics http://127.0.0.1:{e_info['metrics_port']}/metrics), session {session_id}")

        if client:
            uploads = {d.name: d.read_bytes() for d in data_paths}
            dataset = ray.get(architect.curate_uploaded.remote(uploads, dataset_name, test_frac, seed))
        else:
            dataset = ray.get(architect.curate.remote([str(d) for d in data_paths], dataset_name, test_frac, seed))
        c = dataset["manifest"]["counts"]
        r = dataset["manifest"]["reasoning"]
        con.print(f"[green]dataset[/] {dataset_name} @ {dataset['content_hash'][:12]}: {c['train']} train / {c['test']} test, "
                  f"{r['reasoning']} reasoning / {r['direct']} direct")

        hw = ray.get(executor.probe.remote())
        from training.hardware import HardwareProfile, describe

        con.print(f"[green]executor[/] {hw['hostname']}: {describe(HardwareProfile.from_dict(hw))}")
        with con.status(f"preparing model {model_ref} (the SmolLM2 GGUF is converted once, then cached)..."):
            model_cfg = ray.get(executor.prepare_model.remote(model_ref))
        plan = ray.get(architect.design_plan.remote(preset, hw, model_cfg, model_ref, dataset, overrides))
        con.print(_plan_table(plan))
        if not plan["estimate"]["fits"]:
            raise DemoError(f"the plan does not fit this host: estimate {plan['estimate']['total_bytes'] / 2**30:.2f} "
                            f"GiB of {plan['estimate']['budget_bytes'] / 2**30:.2f} GiB", 2)

        spec = ray.get(architect.submission.remote(plan, dataset))
        run_id = ray.get(executor.submit.remote(spec))
        ray.get(architect.log.remote("state", {"step": "submitted", "run_id": run_id}))
        if detach:
            ray.get(architect.commit_session.remote())
            ray.get(architect.close.remote())
            con.print(f"[green]submitted[/] {run_id}; follow it with `duet runs show {run_id}`; "
                      "stop the services with `duet down` when it is done")
            return {"ok": True, "run_id": run_id, "state": "submitted", "workspace": str(ws),
                    "session_id": session_id, "detached": True}
        seen = 0
        scraped: dict = {}
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=con, transient=False) as prog:
            task = prog.add_task(f"training {run_id}", total=plan["train"]["max_steps"], info="preflight")
            while True:
                st = ray.get(executor.status.remote(run_id, seen))
                if st["events"]:
                    ray.get(architect.record_run_events.remote(run_id, st["events"]))
                    seen = st["events"][-1]["seq"] + 1
                p = st["progress"]
                info = st["state"]
                if p.get("loss") is not None:
                    info = f"loss {p['loss']:.3f}" + (f"  {p['tokens_per_second']:.0f} tok/s" if p.get("tokens_per_second") else "")
                prog.update(task, completed=p["step"], info=info)
                if st["state"] == "training" and p["step"] >= 1 and not scraped:
                    scraped = _scrape(executor, e_info, address)
                if st["state"] in ("finished", "failed", "cancelled"):
                    break
                time.sleep(0.5)
        final_scrape = _scrape(executor, e_info, address)
        files = ray.get(executor.fetch_record.remote(run_id))
        rec = files["_record"]
        recorded = ray.get(architect.record_run.remote(files))
        if client:  # the design host's own workspace gets the record too (the head's has it already)
            from roles.architect import record_if_new

            recorded = {**record_if_new(str(ws), emb.postgres_url, emb.mongo_url, files), "head_workspace": head_ws}
        hyp = ray.get(architect.hypothesis_from_run.remote(rec)) if rec["status"] == "finished" else None
        ray.get(architect.commit_session.remote())
        counts = ray.get(architect.store_counts.remote())
        ray.get(architect.close.remote())
        if rec["status"] != "finished":
            raise DemoError(f"run {run_id} {rec['status']}: {rec.get('error')}", 1)
        summary = {
            "ok": True, "run_id": run_id, "workspace": str(ws), "session_id": session_id,
            "model": model_ref, "dataset": {"name": dataset_name, "content_hash": dataset["content_hash"],
                                            "path": dataset["path"]},
            "eval_loss_before": rec["eval_loss_before"], "eval_loss_after": rec["eval_loss_after"],
            "steps": rec["steps"], "train_s": rec["train_s"], "tokens_per_s": rec["tokens_per_s"],
            "run_dir": recorded["path"], "report": str(Path(recorded["path"]) / "report.md"),
            "run_commit": recorded.get("commit"), "metrics_during_training": scraped, "metrics_final": final_scrape,
            "stores": counts, "hypothesis": hyp and {"id": hyp["id"], "status": hyp["status"]},
            "services_started": emb.started, "wall_s": round(time.time() - t0, 1),
        }
        con.print(_summary_table(summary, rec))
        return summary
    finally:
        if executor is not None and emb.started and not detach:
            try:
                ray.kill(executor, no_restart=True)
            except Exception:
                pass
        if ray.is_initialized():
            ray.shutdown()
        if emb.started and not detach:
            stopped = embedded.down(ws, only=emb.started)
            con.print(f"[dim]stopped what the demo started: {', '.join(stopped)}[/]")


def _scrape(executor, e_info: dict, address: str | None) -> dict:
    """Over HTTP where the exporter is on this host; through the actor on a two-host cluster (the
    exporter binds the GPU host's loopback by default)."""
    import ray

    if address is None:
        return scrape(e_info["metrics_port"])
    return scrape(None, ray.get(executor.metrics_text.remote(), timeout=30))


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def _plan_table(plan: dict):
    from rich.table import Table

    est = plan["estimate"]
    t = Table(title=f"plan {plan['run_id']} ({plan['train']['method']} {plan['train']['phase']}, {plan['device']} "
                    f"{plan['dtype']}, {plan['trainable_params'] / 1e6:.2f} M trainable)")
    t.add_column("component")
    t.add_column("estimate", justify="right")
    for k, v in est["breakdown_bytes"].items():
        t.add_row(k, _gib(v))
    verdict = "[green]fits[/]" if est["fits"] else "[red]does not fit[/]"
    t.add_row("[bold]total (training)", f"[bold]{_gib(est['total_bytes'])}")
    for name, ph in (est.get("phases") or {}).items():
        if name != "training":
            t.add_row(f"  {name}" + (f" (on {ph['where']})" if ph.get("where") not in (None, plan["device"]) else ""),
                      _gib(ph["total_bytes"]))
    t.add_row(f"budget ({est.get('usable_fraction', 0.85):.0%} usable)", f"{_gib(est['budget_bytes'])} {verdict}")
    return t


def _summary_table(s: dict, rec: dict):
    from rich.table import Table

    t = Table(title="done", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("run", s["run_id"])
    t.add_row("eval loss", f"{s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}")
    t.add_row("steps", f"{s['steps']} in {s['train_s']:.1f} s ({s['tokens_per_s']} tokens/s)")
    t.add_row("peak memory", f"{rec['peak_memory'].get('rss_peak_bytes', 0) / 2**20:.0f} MiB RSS")
    t.add_row("report", s["report"])
    t.add_row("commit", str(s["run_commit"])[:12])
    t.add_row("stores", json.dumps(s["stores"]))
    t.add_row("wall time", f"{s['wall_s']} s")
    return t
