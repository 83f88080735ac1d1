"""duet plan | train | run | runs | merge: plans, runs and their records."""

from __future__ import annotations

import os
from pathlib import Path

from cluster.cli.common import local_data_dir, workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, emit_json, int_arg
from infra.lazy import lazy
from roles.client import call
from infra.run_states import ended

ray = lazy("ray", extra="architect")
torch = lazy("torch", extra="executor")


def _parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"size {text!r}: use e.g. 24GiB, 16GB, 8000MiB")
    unit = (m.group(2) or "GiB").upper().rstrip("B")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    try:
        value = int(float(m.group(1)) * mult)
    except ValueError as exc:
        raise ValueError(f"size {text!r}: use e.g. 24GiB, 16GB, 8000MiB") from exc
    if not 0 < value <= 2**50:
        raise ValueError(f"size {text!r}: must be above 0 (and at most 1 PiB)")
    return value


def setup_plan(p):
    p.add_argument("--model", required=True, help="a model folder or its config.json")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB")
    p.add_argument("--gpu", help="a GPU by name (memory and bf16 from a table), e.g. rtx3090, rtx4090, t4, a100-80")
    p.add_argument("--preset", default="doica", help="preset name or YAML file (default: doica)")
    p.add_argument("--method", choices=("qlora", "lora", "full"))
    p.add_argument("--seq-len", type=int_arg())
    p.add_argument("--batch", type=int_arg(), help="micro-batch size")
    p.add_argument("--workers", type=int_arg(1, 64), help="data-parallel workers, one a GPU of this size (default 1)")
    p.add_argument("--no-bf16", action="store_true", help="the GPU lacks bf16 (pre-Ampere)")
    p.add_argument("--json", action="store_true")


def run_plan(a) -> int:
    from training.plan.memory_model import ModelProfile
    from training.config import PlanError, load_config
    from training.plan.planner import make_plan

    from training.plan.memory_model import GPUS

    overrides = {k: v for k, v in (("method", a.method), ("seq_len", a.seq_len), ("micro_batch", a.batch),
                                   ("workers", a.workers)) if v is not None}  # 0 is a value (refused by the config model), not "unset"
    bf16 = not a.no_bf16
    try:
        if a.gpu:
            key = a.gpu.lower().replace(" ", "").replace("geforce", "").replace("nvidia", "")
            if key not in GPUS:
                raise ValueError(f"--gpu {a.gpu!r}: unknown; known: {', '.join(GPUS)} (or give --gpu-mem)")
            budget, bf16 = GPUS[key][0], GPUS[key][1] and bf16
        if a.gpu_mem:
            budget = _parse_size(a.gpu_mem)
        if not a.gpu and not a.gpu_mem:
            raise ValueError("give --gpu-mem SIZE or --gpu NAME")
        cfg = load_config(a.preset, overrides, "the command line")
        model = ModelProfile.from_config(a.model)
    except (PlanError, ValueError) as exc:
        print_error(exc)
        return EXIT_INPUT
    plan = make_plan(cfg, model, device="cuda", bf16=bf16, budget_bytes=budget, gpu_count=cfg.world_size)
    doc = plan.to_dict()
    if a.json:
        emit_json(doc)
    else:
        from cluster.console import plan_table as _plan_table

        con = console()
        con.print(_plan_table({**doc, "run_id": cfg.name}))
        for d in doc["decisions"]:
            con.print(f"decision: {d}")
        for s in doc["suggestions"]:
            con.print(f"suggestion: {s['change']} -> {s['total_bytes'] / 2**30:.2f} GiB")
    return EXIT_OK if plan.fits else EXIT_REFUSED


# -- train / run / runs / merge ------------------------------------------------------------------

def setup_train(p):
    p.add_argument("config", help="a plan written by the architect: <workspace>/configs/<run>.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--run-id", help="train under another run id (e.g. to compare with an earlier run)")
    p.add_argument("--data-dir", help="where runs live (default: <workspace>/.duet/executor)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def run_train(a) -> int:
    """Train a plan in this process (the executor's host), in the foreground."""
    import threading

    from training.run.executor import ExecutorError, local_run

    con = console()
    try:
        run = local_run(a.config, workspace=a.workspace, data_dir=a.data_dir, run_id=a.run_id, resume=a.resume)
    except ExecutorError as exc:
        print_error(exc)
        return EXIT_INPUT
    if run.state == "finished":
        con.print(f"run {run.run_id} already finished")
        return EXIT_OK
    threads = int(os.environ.get("DUET_TORCH_THREADS", "0") or 0)
    if not threads and not os.environ.get("OMP_NUM_THREADS"):
        from training.plan.hardware import available_cpus

        threads = available_cpus()  # the cores this process may use, not the machine's count
    if threads:
        torch.set_num_threads(threads)
    t = threading.Thread(target=run.execute, kwargs={"resume": a.resume}, daemon=True)
    t.start()
    from training.track import follow

    follow.start(run.dir)  # report_to: the run's trackers fed by a process of their own (it outlives this one if a tracker is down)
    last = -1
    while t.is_alive():
        t.join(1.0)
        p = run.progress
        if p["step"] != last and not a.json:
            last = p["step"]
            loss = f" loss {p['loss']:.4f}" if p.get("loss") is not None else ""
            con.print(f"[dim]{run.run_id}[/] {run.state} step {p['step']}/{p['max_steps']}{loss}")
    rec = run.record()
    if a.json:
        emit_json({k: rec.get(k) for k in ("run_id", "status", "error", "steps", "eval_loss_before",
                                             "eval_loss_after", "recoveries", "losses", "checkpoints")})
    else:
        con.print(f"run {run.run_id}: {rec['status']}" + (f" ({rec['error']})" if rec.get("error") else "")
                  + f"; record in {run.dir / 'run.json'}")
    return EXIT_OK if rec["status"] == "finished" else EXIT_INPUT


def setup_run(p):
    p.add_argument("config", help="a run config: preset, model, data (see examples/persona/run.yaml)")
    p.add_argument("--detach", action="store_true",
                   help="return once the run is placed on an executor (or queued, when the executors it fits are busy)")
    p.add_argument("--on", metavar="NODE", help="run it on this executor node only (name, IP or hostname)")
    p.add_argument("--address", help="a two-host cluster's head HOST:PORT (default: the embedded cluster, or "
                                     "the cluster a `duet node` here belongs to)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def run_run(a) -> int:
    from cluster import two_host
    from cluster.console import RichReporter
    from cluster.demo import DemoError, run_on_cluster
    from training.config import PlanError, load_run_config

    from memory_sync.secret_scan import SecretFound, scanner

    try:
        rc, data, train = load_run_config(a.config)  # the whole config, its preset and overrides: parsed once, here
    except PlanError as exc:
        print_error(exc)
        return EXIT_INPUT
    found = scanner(a.workspace).scan_file(a.config)  # what it names ends up in the committed plan
    if found:
        print_error(SecretFound(found, action=f"refusing {a.config}"))
        return EXIT_REFUSED
    try:
        summary = run_on_cluster(a.workspace, model=None if rc.model in ("smollm2", "tiny") else rc.model,
                                 reporter=RichReporter(),
                               tiny=rc.model == "tiny", data=[str(d) for d in data], train=train, preset=rc.preset,
                               dataset_name=rc.dataset, title=f"duet run {os.path.basename(a.config)}",
                               detach=a.detach, test_frac=rc.test_frac, seed=rc.seed, on=a.on,
                               address=two_host.cluster_address(a.workspace, a.address) if a.address or _two_host() else None)
    except DemoError as exc:
        print_error(exc)
        return exc.code
    if a.json:
        emit_json(summary)
    return EXIT_OK


def _two_host() -> bool:
    from cluster import two_host

    return any(v["alive"] for v in two_host.local_nodes().values())


def setup_runs(p):
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "cancel", "pause", "resume", "move"))
    p.add_argument("run_id", nargs="?")
    p.add_argument("--to", metavar="NODE", help="with move: the executor node to continue the run on")
    p.add_argument("--address", help="the cluster's head HOST:PORT (default: the one duet knows here)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def run_runs(a) -> int:
    from cluster import two_host
    from infra.services import ServiceError
    from roles.move import MoveRefused

    con = console()
    if a.action != "list" and not a.run_id:
        print_error(f"duet runs {a.action} needs a RUN_ID")
        return EXIT_INPUT
    if a.run_id:  # the input is checked before any cluster is asked (exit 1, not 3)
        from training.config import PlanError, check_run_id

        try:
            check_run_id(a.run_id)
        except PlanError as exc:
            print_error(exc)
            return EXIT_INPUT
    if a.action == "move" and not a.to:
        print_error("duet runs move RUN needs --to NODE")
        return EXIT_INPUT
    try:
        ex = two_host.executor_handle(a.workspace, a.address, run_id=a.run_id)
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA
    try:
        doc = _runs_action(a, ex)
    except ray.exceptions.RayTaskError as exc:
        print_error(exc.cause if hasattr(exc, 'cause') else exc)
        return EXIT_INPUT
    except ValueError as exc:
        print_error(exc)
        return EXIT_INPUT
    except MoveRefused as exc:  # the target cannot take the run
        print_error(exc)
        return EXIT_REFUSED
    if a.json:
        emit_json(doc)
    elif a.action == "list":
        _runs_table(doc)
    else:
        con.print_json(data=doc, default=str)
    return EXIT_OK


def _runs_action(a, ex) -> dict:
    """What `duet runs` asks of the cluster. A read never writes: a run that ended is recorded by the
    architect's recorder (roles/recorder.py); ``recorded`` says whether, where and by whom."""
    from roles import run_view
    from roles.client import scheduler_handle

    if a.action == "list":
        return run_view.overview(a.workspace, scheduler_handle())
    if a.action == "move":
        return _move(a, ex)
    if a.action != "show":
        return run_view.control(a.run_id, a.action, ex, scheduler_handle())
    entry = run_view.queue_entry(scheduler_handle(), a.run_id)
    if entry and entry["state"] == "queued":
        return {"run_id": a.run_id, "state": "queued", "progress": {"step": 0}, "error": None, "queue": entry}
    snap = call(ex, "status", a.run_id, 0, timeout=60)
    doc = {k: snap[k] for k in ("run_id", "state", "progress", "error", "recoveries")}
    doc["executor"] = entry and entry["executor"]
    if ended(snap["state"]):
        doc["recorded"] = run_view.record_state(a.workspace, a.run_id, entry)
    return doc


def _move(a, src) -> dict:
    from roles import move, placement
    from roles.client import scheduler_handle

    if not a.to:
        raise ValueError("duet runs move RUN needs --to NODE")
    try:
        infos = placement.executors_info()
        dst_name = placement.resolve_on(a.to, infos)
    except placement.PlacementError as exc:
        raise ValueError(str(exc)) from exc
    if infos[dst_name]["handle"]._actor_id == src._actor_id:
        raise ValueError(f"run {a.run_id} is on {a.to} already")
    with console().status(f"moving {a.run_id} to {a.to} (stop, copy the newest checkpoint, verify, resume)..."):
        return move.move_run(a.run_id, src, infos[dst_name]["handle"], dst_name, scheduler_handle())


def _runs_table(doc: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from cluster.output import terminal_safe

    t = Table(title="duet runs")
    for col in ("run", "state", "node", "step", "note"):
        t.add_column(col)
    for r in doc["runs"]:
        step = f"{r['step']}/{r['max_steps']}" if r.get("step") is not None else "-"
        note = r.get("error") or ("fits " + ", ".join(r["fits_on"]) if r.get("fits_on") and r["state"] == "queued" else "")
        if r.get("unreachable_since"):
            note = "executor unreachable (node down): resumes when it rejoins"
        t.add_row(*(Text(terminal_safe(str(x))) for x in (r["run_id"], r["state"], r.get("node") or "-", step, note or "")))
    con = console()
    con.print(t)
    if doc["unreachable_executors"]:
        con.print(f"executors not answering: {', '.join(doc['unreachable_executors'])}")


def setup_merge(p):
    p.add_argument("run_id")
    p.add_argument("--data-dir", help="where runs live (default: <workspace>/.duet/executor)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def run_merge(a) -> int:
    """(Re-)merge a trained run's adapter into its base, e.g. after a merge failed for lack of RAM."""
    from training.plan import hardware
    from training.run.engine import Run
    from training.run.executor import ExecutorError
    from training.run.executor import run_dir as checked_run_dir
    from training.run.preflight import preflight

    con = console()
    data_dir = local_data_dir(a)
    try:
        run_dir = checked_run_dir(data_dir, a.run_id)
    except ExecutorError as exc:
        print_error(exc)
        return EXIT_INPUT
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        print_error(f"{run_dir}: no trained adapter to merge")
        return EXIT_INPUT
    run = Run.load(run_dir, hardware.probe(data_dir).to_dict())
    try:
        run.merge_and_evaluate(Path(run.result.get("model_path") or preflight(run)))
    except RuntimeError as exc:
        print_error(exc)
        return EXIT_REFUSED
    run.write_record()
    doc = run.result["merged_model"]
    if a.json:
        emit_json(doc)
    else:
        con.print(f"merged -> {doc['path']} (verified: {doc.get('criterion') or doc.get('verified')})")
        if doc.get("qlora_drift"):
            d = doc["qlora_drift"]
            con.print(f"QLoRA drift from the nf4 model as trained: mean KL {d['kl_mean']:.2e}, "
                      f"top-1 agreement {d['top1_agreement']:.3f}")
    return EXIT_OK


