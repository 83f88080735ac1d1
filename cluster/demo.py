"""``duet demo``: the whole coordinated fine-tune on one machine, on real parts.

The driver only orchestrates: the ArchitectActor curates, plans and records; the ExecutorActor
probes, trains, merges and evaluates; both talk to real Postgres / Mongo-wire / Ray processes.
Services the demo started itself are stopped at the end; services from ``duet up`` are reused
and left running.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
import urllib.request
from pathlib import Path

from cluster import auth, embedded, ray_node
from infra import services
from infra.lazy import lazy
from roles.client import call

ray = lazy("ray", extra="architect")

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
    from training.data.schema import DatasetError, check_records, input_file, scan_jsonl

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
             reporter=None, max_steps: int | None = None) -> dict:
    """The main job: the persona examples, the demo preset, SmolLM2 (or --tiny / --model)."""
    return run_on_cluster(workspace, model=model, tiny=tiny, data=[data] if data else None, reporter=reporter,
                          overrides={"max_steps": max_steps} if max_steps is not None else None,
                          preset="demo", dataset_name="persona", title="duet demo",
                          export={"quant": "q8_0", "name": "persona"})


def _model_ref(model: str | None, tiny: bool) -> str:
    if not model:
        return "tiny" if tiny else "smollm2"
    from training.models import BUILTIN, ModelError, resolve

    if model in BUILTIN:
        return model
    try:
        resolve(model)
    except ModelError as exc:
        raise DemoError(str(exc), 1) from exc
    return str(Path(model).expanduser().resolve())


@dataclass
class Connected:
    """What a job on the cluster works through: the architect, the scheduler (the queue on the head),
    and how to read an executor's metrics and record a run on this host too."""

    emb: object
    architect: object
    scheduler: object
    client: bool
    record_here: object
    address: str | None

    def scrape(self, executor) -> dict:
        """Over HTTP where the exporter is on this host; through the actor on a two-host cluster (the
        exporter binds the GPU host's loopback by default)."""
        if self.address is None:
            return scrape(call(executor, "ping", timeout=60)["metrics_port"])
        return scrape(None, call(executor, "metrics_text", timeout=30))


@contextlib.contextmanager
def connected(workspace: str, *, title: str, reporter, detach: bool = False, address: str | None = None):
    """Bring up the embedded cluster (or join ``address``), start the actors (the local executor on an
    embedded cluster, the architect, the scheduler), and stop what this call started on the way out."""
    rep = reporter
    ws = Path(workspace).resolve()
    auth.apply_auth_env()  # before ray is imported: Ray reads RAY_AUTH_MODE at import
    rep.heading(title)
    try:
        if address:  # a two-host cluster: use it as it is; stores by URL (or none: the outbox keeps writes)
            emb = embedded.Embedded(ws, address, os.environ.get("DUET_POSTGRES_URL"), os.environ.get("DUET_MONGO_URL"), [])
        else:
            with rep.status("starting the embedded cluster (Ray, PostgreSQL, Mongo-wire)..."):
                emb = embedded.up(ws)
    except services.ServiceError as exc:
        raise DemoError(f"infrastructure unavailable: {exc}", 3) from exc
    rep.line("cluster", f"Ray {emb.ray_address} (token auth), Postgres {services.display_url(emb.postgres_url)}, "
                        f"Mongo {emb.mongo_url}" + (f"  (started: {', '.join(emb.started)})" if emb.started else
                                                    "  (reused)"))

    from roles.actors import architect_actor, executor_actor, scheduler_actor

    started_actors = []
    try:
        ray_node.connect(emb.ray_address)
        client = ray_node.is_client(emb.ray_address)
        head_executor = None
        if not address:  # the embedded cluster's own executor, on its head
            head_executor = executor_actor(str(ws / ".duet" / "executor"), services.free_port(METRICS_PORTS))
            started_actors.append(head_executor)
        scheduler = _scheduler(scheduler_actor, ws, address)
        if emb.started:
            started_actors.append(scheduler)
        if client:  # no node here: the architect runs on the head, in a workspace there; data is uploaded
            from cluster import two_host
            from roles import names

            e_info = call(ray.get_actor(names.EXECUTOR_NAME, namespace=names.NAMESPACE), "ping", timeout=120)
            head_ws = two_host.client_workspace(ws)
            architect = architect_actor(head_ws, emb.postgres_url, emb.mongo_url, title, on_node=e_info["node_id"])
            caught = [r["run_id"] for r in two_host.client_catch_up(ws) if "error" not in r]
            if caught:  # runs that ended while this host was away, copied here too
                rep.note(f"recorded here what ended meanwhile: {', '.join(caught)}")

            def record_here(files: dict) -> dict:  # the design host's own workspace gets the record too
                from roles.recorder import record_into

                return {**record_into(str(ws), emb.postgres_url, emb.mongo_url, files), "head_workspace": head_ws}
        else:
            architect, record_here = architect_actor(str(ws), emb.postgres_url, emb.mongo_url, title), None
        recorder = _recorder(architect, emb)
        if emb.started:
            started_actors.append(recorder)
        yield Connected(emb, architect, scheduler, client, record_here, address)
    finally:
        if emb.started and not detach:
            for actor in started_actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:
                    pass
        if ray.is_initialized():
            ray.shutdown()
        if emb.started and not detach:
            stopped = embedded.down(ws, only=emb.started)
            rep.note(f"stopped what the demo started: {', '.join(stopped)}")


def _recorder(architect, emb):
    """The recorder of the architect's workspace, on the architect's host (created once, detached): it
    records every run of the workspace that ends, whether or not a driver is there to see it."""
    from roles.actors import recorder_actor
    from roles.client import call

    info = call(architect, "ping", timeout=120)
    return recorder_actor(info["workspace"], emb.postgres_url, emb.mongo_url, info["node_id"])


def _scheduler(scheduler_actor, ws: Path, address: str | None):
    """The head's scheduler; created here when the head has none yet (a head `duet node start` makes
    its own): over <workspace>/.duet/queue.json on the embedded cluster, else beside the head
    executor's data dir."""
    from roles import names

    try:
        return scheduler_actor()
    except ValueError:
        pass
    if not address:
        return scheduler_actor(str(ws / ".duet" / "queue.json"))
    try:
        head = call(ray.get_actor(names.EXECUTOR_NAME, namespace=names.NAMESPACE), "ping", timeout=120)
        return scheduler_actor(str(Path(head["data_dir"]) / "queue.json"))
    except ValueError:
        return scheduler_actor("~/.local/share/duet/queue.json")


def preset_label(preset: str) -> str:
    """What a training config came from, as a record names it: the preset's name, or its file's name
    (its content travels in the request; a path means nothing on the host that plans)."""
    return preset if "/" not in preset and not preset.endswith((".yaml", ".yml")) else Path(preset).name


def _train_config(preset: str, overrides: dict | None):
    """The training config of a built-in job (the demo's): DemoError (exit 1) when it does not validate."""
    from training.config import PlanError, load_config

    try:
        return load_config(preset, overrides)
    except PlanError as exc:
        raise DemoError(str(exc), 1) from exc


def run_on_cluster(workspace: str, *, model: str | None = None, tiny: bool = False, data: list[str] | None = None,
                   reporter=None, overrides: dict | None = None, preset: str = "demo",
                   dataset_name: str = "persona", title: str = "duet run", detach: bool = False,
                   test_frac: float = 0.1, seed: int = 0, address: str | None = None,
                   export: dict | None = None, on: str | None = None, train=None) -> dict:
    """Bring up the embedded cluster (or join ``address``), run the pipeline (roles/pipeline.py):
    planned for every executor, queued, placed by the head's scheduler (``on``: on that node only).

    ``detach``: return once the run is placed (or queued, when every executor it fits is busy); the
    run goes on without this driver (and the services stay up); ``duet runs show ID`` picks up the
    record later.
    """
    from roles.pipeline import Job, PipelineError, QuietReporter, run_pipeline

    rep = reporter or QuietReporter()
    train = train if train is not None else _train_config(preset, overrides)
    t0 = time.time()
    data_paths = [Path(d) for d in data] if data else [DEFAULT_DATA]
    model_ref = _model_ref(model, tiny)
    ws = Path(workspace).resolve()
    for d in data_paths:
        precheck(d, ws)
    with connected(workspace, title=title, reporter=rep, detach=detach, address=address) as c:
        job = Job(ws, data_paths, model_ref, preset_label(preset), train, dataset_name, test_frac, seed, detach, on, export,
                  extra={"services_started": c.emb.started})
        try:
            return run_pipeline(job, c.architect, c.scheduler, client=c.client, reporter=rep,
                                record_here=c.record_here, scrape=c.scrape, started_at=t0)
        except PipelineError as exc:
            raise DemoError(str(exc), exc.code) from exc


def run_points(workspace: str, rc, data: list, points: list[dict], sweep_id: str, *, address: str | None,
               reporter=None, max_parallel: int = 1, on: str | None = None) -> list[dict]:
    """A sweep's grid points (roles/sweep.expand) on one dataset version, spread over the executors by
    the head's scheduler, at most ``max_parallel`` at a time (roles/sweep_pipeline.py): each
    {"point", "run_id", "record"}, or {"point", "status": "failed", "error"} (the others go on)."""
    from roles.pipeline import Job, PipelineError, QuietReporter
    from roles.sweep_pipeline import run_sweep_pipeline

    rep = reporter or QuietReporter()
    data_paths = [Path(d) for d in data]
    ws = Path(workspace).resolve()
    for d in data_paths:
        precheck(d, ws)
    model_ref = _model_ref(rc.model, False)
    with connected(workspace, title=f"sweep {sweep_id}: {len(points)} runs", reporter=rep, address=address) as c:
        job = Job(ws, data_paths, model_ref, preset_label(rc.preset), None, rc.dataset, rc.test_frac, rc.seed, on=on)
        try:
            runs = run_sweep_pipeline(job, points, sweep_id, max_parallel, c.architect, c.scheduler, client=c.client,
                                      reporter=rep, record_here=c.record_here)
        except PipelineError as exc:
            raise DemoError(str(exc), exc.code) from exc
        call(c.architect, "close")
        return runs
