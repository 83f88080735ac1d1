"""The ``duet`` command line: one table of commands (COMMANDS) mapping names to plain functions.

Contract (DESIGN.md): every reporting command accepts ``--json`` and prints one JSON document on
stdout; exit codes 0 ok, 1 invalid input, 2 refused (plan, policy, conflict),
3 infrastructure unavailable. Heavy libraries are imported inside the commands, so ``duet --help``
stays fast and the design host needs no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, float_arg, int_arg, print_error


@dataclass
class Command:
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _emit_json(doc: dict) -> None:
    output.emit_json(doc)


def _console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def _workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=os.environ.get("DUET_WORKSPACE", "duet-workspace"),
                   help="workspace directory (default: ./duet-workspace or $DUET_WORKSPACE)")


# -- demo / up / down / status -----------------------------------------------------------------

def _setup_demo(p):
    _workspace_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a local Hugging Face model folder instead of the bundled SmolLM2-135M")
    g.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 built from a config (fast; for tests)")
    p.add_argument("--data", help="a chat JSONL file instead of examples/persona/persona.jsonl")
    p.add_argument("--max-steps", type=int_arg(1), help="override the demo preset's optimizer steps")
    p.add_argument("--json", action="store_true", help="print a summary JSON document on stdout")


def _run_demo(a) -> int:
    from cluster.demo import DemoError, run_demo

    try:
        summary = run_demo(a.workspace, model=a.model, tiny=a.tiny, data=a.data, max_steps=a.max_steps)
    except DemoError as exc:
        print_error(exc)
        if a.json:
            _emit_json({"ok": False, "error": str(exc), "exit_code": exc.code})
        return exc.code
    if a.json:
        _emit_json(summary)
    return EXIT_OK


def _setup_up(p):
    _workspace_arg(p)
    p.add_argument("--json", action="store_true")


def _run_up(a) -> int:
    from cluster import embedded
    from infra.services import ServiceError, display_url
    from memory_sync.workspace import Workspace

    Workspace(a.workspace).init()
    try:
        emb = embedded.up(a.workspace)
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA
    if a.json:
        _emit_json({**emb.to_dict(), "postgres_url": display_url(emb.postgres_url)})
    else:
        _console().print(f"up: Ray {emb.ray_address}, Postgres {display_url(emb.postgres_url)}, Mongo {emb.mongo_url} "
                         f"(started: {', '.join(emb.started) or 'nothing, all reused'})")
    return EXIT_OK


def _run_down(a) -> int:
    from cluster import embedded

    stopped = embedded.down(a.workspace)
    if a.json:
        _emit_json({"stopped": stopped})
    else:
        _console().print(f"down: stopped {', '.join(stopped) or 'nothing (nothing was running)'}")
    return EXIT_OK


def _setup_status(p):
    _setup_up(p)
    p.add_argument("--address", help="a two-host cluster's head HOST:PORT, or ray://HOST:PORT as a client "
                                     "(default: the cluster duet knows here)")


def _run_status(a) -> int:
    from cluster import auth, embedded, nodes
    from infra.services import display_url, port_open

    st = embedded.running(a.workspace)
    for v in st.values():
        if v.get("url"):
            v["url"] = display_url(v["url"])
    doc = {"workspace": os.path.abspath(a.workspace), "services": st}
    for name in ("postgres", "mongo"):
        if name in st:
            st[name]["reachable"] = port_open(st[name]["port"])
    head = st.get("head")
    auth.apply_auth_env()
    try:
        doc["cluster"] = nodes.status(a.address or (head["address"] if head and head["alive"] else None))
    except Exception as exc:  # status reports; it does not fail
        doc["cluster"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if a.json:
        _emit_json(doc)
    else:
        from rich.table import Table

        t = Table(title=f"duet status: {doc['workspace']}")
        for col in ("service", "pid", "address", "alive"):
            t.add_column(col)
        for name, v in st.items():
            t.add_row(name, str(v["pid"]), v.get("url") or v.get("address", ""), "yes" if v["alive"] else "no")
        con = _console()
        con.print(t if st else "no embedded services for this workspace")
        cl = doc["cluster"]
        if cl.get("error"):
            con.print(f"cluster: {cl['error']}")
        else:
            ct = Table(title=f"cluster {cl['address']}")
            for col in ("node", "roles", "alive", "GPUs", "memory"):
                ct.add_column(col)
            for n in cl["nodes"]:
                ct.add_row(n["address"], ",".join(n["roles"]) or "-", "yes" if n["alive"] else "no", str(n["gpus"]),
                           f"{n['memory_bytes'] / 2**30:.1f} GiB")
            con.print(ct)
            for actor in cl["actors"]:
                con.print(f"actor {actor['name']} on {actor['address']} (pid {actor['pid']})")
            for r in cl["runs"]:
                con.print(f"run {r['run_id']}: {r['state']} step {r['step']}/{r['max_steps']}"
                          + (f", ETA {r['eta_s']:.0f} s" if r.get("eta_s") else ""))
    return EXIT_OK


# -- data / plan ---------------------------------------------------------------------------------

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


def _setup_plan(p):
    p.add_argument("--model", required=True, help="a model folder or its config.json")
    p.add_argument("--gpu-mem", help="GPU memory, e.g. 24GiB")
    p.add_argument("--gpu", help="a GPU by name (memory and bf16 from a table), e.g. rtx3090, rtx4090, t4, a100-80")
    p.add_argument("--preset", default="doica", help="preset name or YAML file (default: doica)")
    p.add_argument("--method", choices=("qlora", "lora", "full"))
    p.add_argument("--seq-len", type=int_arg())
    p.add_argument("--batch", type=int_arg(), help="micro-batch size")
    p.add_argument("--no-bf16", action="store_true", help="the GPU lacks bf16 (pre-Ampere)")
    p.add_argument("--json", action="store_true")


def _run_plan(a) -> int:
    from training.memory_model import ModelProfile
    from training.config import PlanError, load_config
    from training.plan import make_plan

    from training.memory_model import GPUS

    overrides = {k: v for k, v in (("method", a.method), ("seq_len", a.seq_len), ("micro_batch", a.batch))
                 if v is not None}  # 0 is a value (refused by the config model), not "unset"
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
    plan = make_plan(cfg, model, device="cuda", bf16=bf16, budget_bytes=budget)
    doc = plan.to_dict()
    if a.json:
        _emit_json(doc)
    else:
        from cluster.demo import _plan_table

        con = _console()
        con.print(_plan_table({**doc, "run_id": cfg.name}))
        for d in doc["decisions"]:
            con.print(f"decision: {d}")
        for s in doc["suggestions"]:
            con.print(f"suggestion: {s['change']} -> {s['total_bytes'] / 2**30:.2f} GiB")
    return EXIT_OK if plan.fits else EXIT_REFUSED


# -- train / run / runs / merge ------------------------------------------------------------------

def _setup_train(p):
    p.add_argument("config", help="a plan written by the architect: <workspace>/configs/<run>.yaml")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--run-id", help="train under another run id (e.g. to compare with an earlier run)")
    p.add_argument("--data-dir", help="where runs live (default: <workspace>/.duet/executor)")
    p.add_argument("--json", action="store_true")
    _workspace_arg(p)


def _run_train(a) -> int:
    """Train a plan in this process (the executor's host), in the foreground."""
    import threading

    from training.executor import ExecutorError, local_run

    con = _console()
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
        from training.hardware import available_cpus

        threads = available_cpus()  # the cores this process may use, not the machine's count
    if threads:
        import torch

        torch.set_num_threads(threads)
    t = threading.Thread(target=run.execute, kwargs={"resume": a.resume}, daemon=True)
    t.start()
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
        _emit_json({k: rec.get(k) for k in ("run_id", "status", "error", "steps", "eval_loss_before",
                                             "eval_loss_after", "recoveries", "losses", "checkpoints")})
    else:
        con.print(f"run {run.run_id}: {rec['status']}" + (f" ({rec['error']})" if rec.get("error") else "")
                  + f"; record in {run.dir / 'run.json'}")
    return EXIT_OK if rec["status"] == "finished" else EXIT_INPUT


def _setup_run(p):
    p.add_argument("config", help="a run config: preset, model, data (see examples/persona/run.yaml)")
    p.add_argument("--detach", action="store_true", help="return once the executor accepted the run")
    p.add_argument("--address", help="a two-host cluster's head HOST:PORT (default: the embedded cluster, or "
                                     "the cluster a `duet node` here belongs to)")
    p.add_argument("--json", action="store_true")
    _workspace_arg(p)


def _run_run(a) -> int:
    from cluster import nodes
    from cluster.demo import DemoError, run_pipeline
    from training.config import PlanError, load_run_config

    from memory_sync.secret_scan import SecretFound, scanner

    try:
        rc, data, _ = load_run_config(a.config)  # the whole config, its preset and overrides, before anything starts
    except PlanError as exc:
        print_error(exc)
        return EXIT_INPUT
    found = scanner(a.workspace).scan_file(a.config)  # what it names ends up in the committed plan
    if found:
        print_error(SecretFound(found, action=f"refusing {a.config}"))
        return EXIT_REFUSED
    try:
        summary = run_pipeline(a.workspace, model=None if rc.model in ("smollm2", "tiny") else rc.model,
                               tiny=rc.model == "tiny", data=[str(d) for d in data], overrides=rc.overrides, preset=rc.preset,
                               dataset_name=rc.dataset, title=f"duet run {os.path.basename(a.config)}",
                               detach=a.detach, test_frac=rc.test_frac, seed=rc.seed,
                               address=nodes.cluster_address(a.workspace, a.address) if a.address or _two_host() else None)
    except DemoError as exc:
        print_error(exc)
        return exc.code
    if a.json:
        _emit_json(summary)
    return EXIT_OK


def _two_host() -> bool:
    from cluster import nodes

    return any(v["alive"] for v in nodes.local_nodes().values())


def _setup_runs(p):
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "cancel", "pause", "resume"))
    p.add_argument("run_id", nargs="?")
    p.add_argument("--address", help="the cluster's head HOST:PORT (default: the one duet knows here)")
    p.add_argument("--json", action="store_true")
    _workspace_arg(p)


def _run_runs(a) -> int:
    from cluster import embedded, nodes
    from infra.services import ServiceError
    from roles.architect import record_if_new

    con = _console()
    if a.action != "list" and not a.run_id:
        print_error(f"duet runs {a.action} needs a RUN_ID")
        return EXIT_INPUT
    try:
        ex = nodes.executor_handle(a.workspace, a.address)
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA
    import ray

    try:
        if a.action == "list":
            doc = {"runs": ray.get(ex.list.remote(), timeout=60)}
        elif a.action == "show":
            snap = ray.get(ex.status.remote(a.run_id, 0), timeout=60)
            doc = {k: snap[k] for k in ("run_id", "state", "progress", "error", "recoveries")}
            if snap["state"] in ("finished", "failed", "cancelled"):
                st = embedded.running(a.workspace)
                pg = st.get("postgres", {}).get("url") if st.get("postgres", {}).get("alive") else None
                mongo = st.get("mongo", {}).get("url") if st.get("mongo", {}).get("alive") else None
                doc["recorded"] = record_if_new(a.workspace, os.environ.get("DUET_POSTGRES_URL") or pg,
                                                os.environ.get("DUET_MONGO_URL") or mongo,
                                                ray.get(ex.fetch_record.remote(a.run_id)))
        else:
            doc = ray.get(getattr(ex, a.action).remote(a.run_id), timeout=60)
    except ray.exceptions.RayTaskError as exc:
        print_error(exc.cause if hasattr(exc, 'cause') else exc)
        return EXIT_INPUT
    if a.json:
        _emit_json(doc)
    else:
        con.print_json(data=doc, default=str)
    return EXIT_OK


def _setup_merge(p):
    p.add_argument("run_id")
    p.add_argument("--data-dir", help="where runs live (default: <workspace>/.duet/executor)")
    p.add_argument("--json", action="store_true")
    _workspace_arg(p)


def _run_merge(a) -> int:
    """(Re-)merge a trained run's adapter into its base, e.g. after a merge failed for lack of RAM."""
    from training import hardware
    from training.engine import Run

    from training.executor import ExecutorError
    from training.executor import run_dir as checked_run_dir

    con = _console()
    data_dir = Path(a.data_dir) if a.data_dir else Path(a.workspace).resolve() / ".duet" / "executor"
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
        run.merge_and_evaluate(Path(run.result.get("model_path") or run.preflight()))
    except RuntimeError as exc:
        print_error(exc)
        return EXIT_REFUSED
    run._write_record()
    doc = run.result["merged_model"]
    if a.json:
        _emit_json(doc)
    else:
        con.print(f"merged -> {doc['path']} (verified: {doc.get('criterion') or doc.get('verified')})")
        if doc.get("qlora_drift"):
            d = doc["qlora_drift"]
            con.print(f"QLoRA drift from the nf4 model as trained: mean KL {d['kl_mean']:.2e}, "
                      f"top-1 agreement {d['top1_agreement']:.3f}")
    return EXIT_OK


# -- node ------------------------------------------------------------------------------------------

def _setup_node(p):
    sub = p.add_subparsers(dest="node_cmd", metavar="{start,join,stop}")
    st = sub.add_parser("start", help="start a Ray head with a role (the GPU host: --role executor --head)")
    st.add_argument("--role", choices=("executor", "architect"), default="executor")
    st.add_argument("--head", action="store_true", required=True, help="start the head node (required)")
    st.add_argument("--bind", default="127.0.0.1", help="this node's address: a LAN/VPN IP (never 0.0.0.0 by default)")
    st.add_argument("--port", type=int_arg(1, 65535), default=6390)
    st.add_argument("--data-dir", help="where the executor keeps runs (default ~/.local/share/duet/executor)")
    st.add_argument("--workspace", help="the architect's workspace (role architect)")
    st.add_argument("--metrics-port", type=int_arg(1, 65535), default=9108)
    st.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (off by default)")
    st.add_argument("--allow-all-interfaces", action="store_true", help="allow --bind 0.0.0.0")
    st.add_argument("--client-port", type=int_arg(0, 65535), help="Ray Client port for design hosts that connect with "
                                                    "--client (default: --port + 1; 0: off)")
    st.add_argument("--json", action="store_true")
    jn = sub.add_parser("join", help="join a head with a role (the design host: --role architect)")
    jn.add_argument("--role", choices=("executor", "architect"), default="architect")
    jn.add_argument("--address", required=True, help="the head's HOST:PORT")
    jn.add_argument("--bind", default="127.0.0.1", help="this node's own address")
    jn.add_argument("--token-file", help="the head's token file, copied here (default: this host's config dir)")
    jn.add_argument("--workspace", help="the architect's workspace on this host")
    jn.add_argument("--data-dir", help="where an executor keeps runs")
    jn.add_argument("--metrics-port", type=int_arg(1, 65535), default=9108)
    jn.add_argument("--timeout", type=float_arg(0, 86400, lo_open=True), default=30, help="seconds before giving up on the head")
    jn.add_argument("--client", action="store_true",
                    help="no node here: check that this host can drive the cluster through the head's Ray Client "
                         "port (--address ray://HOST:CLIENT_PORT), then use that address with run/runs/status")
    jn.add_argument("--allow-all-interfaces", action="store_true")
    jn.add_argument("--json", action="store_true")
    sp = sub.add_parser("stop", help="stop the nodes duet started on this machine, by PID")
    sp.add_argument("--all", action="store_true", help="every node duet started here (default: the newest)")
    sp.add_argument("--json", action="store_true")


def _run_node(a) -> int:
    from cluster import nodes
    from infra.services import ServiceError

    con = _console()
    if a.node_cmd is None:
        con.print("usage: duet node {start,join,stop} ...")
        return EXIT_INPUT
    try:
        if a.node_cmd == "start":
            doc = nodes.start_head(role=a.role, bind=a.bind, port=a.port, data_dir=a.data_dir, workspace=a.workspace,
                                   dashboard=a.dashboard, allow_all=a.allow_all_interfaces, metrics_port=a.metrics_port,
                                   client_port=a.client_port)
            if not a.json:
                con.print(f"head {doc['address']} ({a.role}, {doc['gpus']} GPU), token auth on; actor {doc['actor']}")
                if doc["token_created"]:
                    con.print(f"token created: {doc['token_file']} (mode 0600, never committed)")
                con.print(f"on the design host: {doc['join']}")
                if doc["client_address"]:
                    con.print(f"or, where joining as a node is not possible: --address {doc['client_address']} "
                              "(Ray Client; the architect then runs here)")
        elif a.node_cmd == "join":
            if a.client:
                doc = nodes.client_check(a.address, token_file=a.token_file, timeout=a.timeout)
            else:
                doc = nodes.join(address=a.address, role=a.role, bind=a.bind, token_file=a.token_file,
                                 workspace=a.workspace, data_dir=a.data_dir, timeout=a.timeout,
                                 allow_all=a.allow_all_interfaces, metrics_port=a.metrics_port)
            if not a.json:
                if doc.get("warning"):
                    con.print(f"[yellow]warning:[/] {doc['warning']}")
                if a.client:
                    con.print(f"{doc['address']} answers as a client (versions {'checked' if doc['versions']['checked'] else 'not published'});"
                              f" use --address {doc['address']} with duet run / runs / status")
                else:
                    con.print(f"joined {a.address} as {a.role}; actor {doc['actor']}")
        else:
            doc = {"stopped": nodes.stop(all_nodes=a.all)}
            if not a.json:
                con.print(f"stopped: {', '.join(doc['stopped']) or 'nothing (no node duet started is running)'}")
    except nodes.VersionMismatch as exc:
        print_error(exc)
        return EXIT_REFUSED
    except (ServiceError, TimeoutError, ConnectionError) as exc:
        print_error(exc)
        return EXIT_INFRA
    except (ValueError, FileNotFoundError) as exc:
        print_error(exc)
        return EXIT_INPUT
    if a.json:
        _emit_json(doc)
    return EXIT_OK


# -- the table -----------------------------------------------------------------------------------

from cluster import cli_data, cli_memory, cli_monitor, output  # noqa: E402  (session + memory commands import this module lazily)


COMMANDS: dict[str, Command] = {
    "demo": Command("the main job, embedded, offline", _setup_demo, _run_demo),
    "up": Command("start the embedded cluster + stores for this workspace", _setup_up, _run_up),
    "down": Command("stop what duet started for this workspace", _setup_up, _run_down),
    "status": Command("what runs for this workspace", _setup_status, _run_status),
    "node": Command("start | join | stop a node of a two-host cluster", _setup_node, _run_node),
    "data": Command("import | check | curate datasets", cli_data.setup_data, cli_data.run_data),
    "plan": Command("estimate memory for a model + preset on a GPU size", _setup_plan, _run_plan),
    "run": Command("curate, plan and train a run config through the actors", _setup_run, _run_run),
    "train": Command("train an architect's plan in this process [--resume]", _setup_train, _run_train),
    "runs": Command("list | show | cancel | pause | resume runs on the executor", _setup_runs, _run_runs),
    "watch": Command("live view of a run (step/ETA, loss sparklines, tokens/s, memory, alerts)",
                     cli_monitor.setup_watch, cli_monitor.run_watch),
    "merge": Command("merge a run's adapter into its base (16/32-bit, verified)", _setup_merge, _run_merge),
    "session": Command("start | log | note | decide | list | show | resume | handoff | close work sessions",
                       cli_memory.setup_session, cli_memory.run_session),
    "memory": Command("sync | search | hypothesize | promote | backup | restore memory",
                      cli_memory.setup_memory, cli_memory.run_memory),
    "infra": Command("up | down | status for Prometheus + Alertmanager", cli_monitor.setup_infra, cli_monitor.run_infra),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with the CLI contract's exit code for a bad argument (1: invalid input; argparse's
    own 2 means "refused" here)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="duet", description="Two machines fine-tune a personal LLM together.",
        epilog="exit codes: 0 ok, 1 invalid input, 2 refused (plan, policy, conflict), 3 infrastructure unavailable")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.setup(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # `duet session log ID --role user some text`: words after an option belong to the text
        if isinstance(getattr(a, "text", None), list) and extra[0] == "--":  # `-- -text`: all of it is text
            a.text += extra[1:]
        elif isinstance(getattr(a, "text", None), list) and not any(x.startswith("-") for x in extra):
            a.text += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not a.command:
        parser.print_help()
        return EXIT_OK
    cmd = COMMANDS[a.command]
    if getattr(a, "json", False) and argv is None:  # a process of its own (not a test calling main())
        output.stdout_for_json_only()
    try:
        return cmd.run(a)
    except KeyboardInterrupt:
        _console().print("[red]interrupted[/]")
        return 130
    except Exception as exc:  # errors a command left to this table; never a traceback (DUET_DEBUG=1 shows it)
        if os.environ.get("DUET_DEBUG"):
            raise
        return _fail(a, exc, output.exit_code_for(exc), unexpected=not _expected(exc))


def _expected(exc: BaseException) -> bool:
    """Errors about the input, a policy or a service (as opposed to a bug in duet)."""
    from infra.services import ServiceError
    from memory_sync.secret_scan import SecretFound
    from memory_sync.workspace import WorkspaceError

    return isinstance(exc, (ValueError, OSError, SecretFound, WorkspaceError, ServiceError, UnicodeError))


def _fail(a, exc: BaseException, code: int, unexpected: bool = False) -> int:
    msg = output.describe(exc)
    if unexpected:
        msg = (f"unexpected {type(exc).__name__}: {msg} (a bug in duet: please report it; "
               "DUET_DEBUG=1 shows the traceback)")
    print_error(msg)
    if getattr(a, "json", False):
        output.emit_json({"ok": False, "error": msg, "exit_code": code})
    return code


if __name__ == "__main__":
    sys.exit(main())
