"""duet demo | up | down | status | node: the embedded cluster and the nodes of a two-host cluster."""

from __future__ import annotations

import os

from cluster.cli.common import workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, emit_json, float_arg, int_arg


def setup_demo(p):
    workspace_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", help="a local Hugging Face model folder instead of the bundled SmolLM2-135M")
    g.add_argument("--tiny", action="store_true", help="a tiny random Qwen2 built from a config (fast; for tests)")
    p.add_argument("--data", help="a chat JSONL file instead of examples/persona/persona.jsonl")
    p.add_argument("--max-steps", type=int_arg(1), help="override the demo preset's optimizer steps")
    p.add_argument("--json", action="store_true", help="print a summary JSON document on stdout")


def run_demo(a) -> int:
    from cluster import demo
    from cluster.console import RichReporter
    from cluster.demo import DemoError

    try:
        summary = demo.run_demo(a.workspace, model=a.model, tiny=a.tiny, data=a.data, max_steps=a.max_steps,
                                reporter=RichReporter())
    except DemoError as exc:
        print_error(exc)
        if a.json:
            emit_json({"ok": False, "error": str(exc), "exit_code": exc.code})
        return exc.code
    if a.json:
        emit_json(summary)
    return EXIT_OK


def setup_up(p):
    workspace_arg(p)
    p.add_argument("--json", action="store_true")


def setup_up_dashboard(p):
    setup_up(p)
    _dashboard_args(p)


def _dashboard_args(p):
    p.add_argument("--dashboard", action="store_true", help="also serve the web dashboard (on 127.0.0.1 unless "
                                                            "--dashboard-bind); prints its login URL")
    p.add_argument("--dashboard-bind", default="127.0.0.1", help="the dashboard's address (default 127.0.0.1)")
    p.add_argument("--dashboard-port", type=int_arg(1, 65535), help="default: the first free port from 8750")


def _start_dashboard(a, state_dir, workspace, address=None, key="dashboard") -> dict | None:
    """The dashboard in the background when --dashboard was given (cluster/web/server.py)."""
    if not getattr(a, "dashboard", False):
        return None
    from cluster import addresses
    from cluster.web import server

    a.dashboard_bind = addresses.check_bind(a.dashboard_bind, getattr(a, "allow_all_interfaces", False))
    return server.start_background(state_dir, workspace, bind=a.dashboard_bind, port=a.dashboard_port,
                                   address=address, key=key)


def run_up(a) -> int:
    from cluster import embedded
    from infra.services import ServiceError, display_url
    from memory_sync.workspace import Workspace

    try:
        embedded.check_queue(a.workspace)
    except ValueError as exc:
        print_error(exc)
        return EXIT_INPUT
    Workspace(a.workspace).init()
    try:
        emb = embedded.up(a.workspace)
        dash = _start_dashboard(a, embedded.state_dir(a.workspace), a.workspace)
    except ValueError as exc:
        print_error(exc)
        return EXIT_INPUT
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA
    if a.json:
        emit_json({**emb.to_dict(), "postgres_url": display_url(emb.postgres_url), "dashboard": dash})
    else:
        console().print(f"up: Ray {emb.ray_address}, Postgres {display_url(emb.postgres_url)}, Mongo {emb.mongo_url} "
                         f"(started: {', '.join(emb.started) or 'nothing, all reused'})")
        if dash:
            console().print(f"dashboard: {dash['login_url']}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


def run_down(a) -> int:
    from cluster import embedded

    stopped = embedded.down(a.workspace)
    if a.json:
        emit_json({"stopped": stopped})
    else:
        console().print(f"down: stopped {', '.join(stopped) or 'nothing (nothing was running)'}")
    return EXIT_OK


def setup_status(p):
    setup_up(p)
    p.add_argument("--address", help="a two-host cluster's head HOST:PORT, or ray://HOST:PORT as a client "
                                     "(default: the cluster duet knows here)")


def run_status(a) -> int:
    from cluster import auth, cluster_status, embedded
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
        doc["cluster"] = cluster_status.status(a.address or (head["address"] if head and head["alive"] else None))
    except Exception as exc:  # status reports; it does not fail
        doc["cluster"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if a.json:
        emit_json(doc)
    else:
        from rich.table import Table

        t = Table(title=f"duet status: {doc['workspace']}")
        for col in ("service", "pid", "address", "alive"):
            t.add_column(col)
        for name, v in st.items():
            t.add_row(name, str(v["pid"]), v.get("url") or v.get("address", ""), "yes" if v["alive"] else "no")
        con = console()
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
            et = Table(title="executors")
            for col in ("node", "address", "device", "free / total", "training"):
                et.add_column(col)
            for e in cl.get("executors", []):
                if e.get("error"):
                    et.add_row(e["node"], "-", "-", "-", e["error"])
                    continue
                et.add_row(e["node"], f"{e['ip']} ({e['host']})", e["gpu"] or e["device"],
                           f"{e['free_bytes'] / 2**30:.1f} / {(e['total_bytes'] or 0) / 2**30:.1f} GiB", e.get("training") or "idle")
            con.print(et)
            for r in cl["runs"]:
                con.print(f"run {r['run_id']} on {r.get('node')}: {r['state']} step {r['step']}/{r['max_steps']}"
                          + (f", ETA {r['eta_s']:.0f} s" if r.get("eta_s") else ""))
            queued = [q for q in cl.get("queue", []) if q["state"] == "queued"]
            con.print(f"queue: {len(queued)} waiting" + "".join(f"\n  {q['run_id']} (fits {', '.join(q['fits_on'])})"
                                                              for q in queued))
    return EXIT_OK


def setup_node(p):
    sub = p.add_subparsers(dest="node_cmd", metavar="{start,join,stop}")
    st = sub.add_parser("start", help="start a Ray head with a role (the GPU host: --role executor --head)")
    st.add_argument("--role", choices=("executor", "architect"), default="executor")
    st.add_argument("--head", action="store_true", required=True, help="start the head node (required)")
    st.add_argument("--bind", default="127.0.0.1", help="this node's address: a LAN/VPN IP (never 0.0.0.0 by default)")
    st.add_argument("--port", type=int_arg(1, 65535), default=6390)
    st.add_argument("--data-dir", help="where the executor keeps runs (default ~/.local/share/duet/executor)")
    st.add_argument("--workspace", help="the architect's workspace (role architect)")
    st.add_argument("--metrics-port", type=int_arg(1, 65535), default=9108)
    st.add_argument("--ray-dashboard", action="store_true", help="start Ray's own dashboard (off by default)")
    _dashboard_args(st)
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
    jn.add_argument("--name", help="an executor node's name (default: its --bind address); join again under the same "
                                   "name after the node died, and its runs resume here")
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


def run_node(a) -> int:
    from cluster import addresses, two_host
    from infra.services import ServiceError

    con = console()
    if a.node_cmd is None:
        con.print("usage: duet node {start,join,stop} ...")
        return EXIT_INPUT
    try:
        if a.node_cmd == "start":
            if a.dashboard:
                a.dashboard_bind = addresses.check_bind(a.dashboard_bind, a.allow_all_interfaces)
            doc = two_host.start_head(role=a.role, bind=a.bind, port=a.port, data_dir=a.data_dir, workspace=a.workspace,
                                   dashboard=a.ray_dashboard, allow_all=a.allow_all_interfaces, metrics_port=a.metrics_port,
                                   client_port=a.client_port)
            doc["dashboard"] = _start_dashboard(a, two_host.dashboard_state_dir(), a.workspace or os.environ.get(
                "DUET_WORKSPACE", "duet-workspace"), address=doc["address"], key=f"dashboard-{doc['key']}")
            if not a.json:
                con.print(f"head {doc['address']} ({a.role}, {doc['gpus']} GPU), token auth on; actor {doc['actor']}")
                if doc["token_created"]:
                    con.print(f"token created: {doc['token_file']} (mode 0600, never committed)")
                con.print(f"on the design host: {doc['join']}")
                if doc["client_address"]:
                    con.print(f"or, where joining as a node is not possible: --address {doc['client_address']} "
                              "(Ray Client; the architect then runs here)")
                if doc["dashboard"]:
                    con.print(f"dashboard: {doc['dashboard']['login_url']}", markup=False, highlight=False, soft_wrap=True)
        elif a.node_cmd == "join":
            if a.client:
                doc = two_host.client_check(a.address, token_file=a.token_file, timeout=a.timeout,
                                            workspace=a.workspace)
            else:
                doc = two_host.join(address=a.address, role=a.role, bind=a.bind, token_file=a.token_file,
                                 workspace=a.workspace, data_dir=a.data_dir, timeout=a.timeout,
                                 allow_all=a.allow_all_interfaces, metrics_port=a.metrics_port, name=a.name)
            if not a.json:
                if doc.get("warning"):
                    con.print(f"[yellow]warning:[/] {doc['warning']}")
                if a.client:
                    con.print(f"{doc['address']} answers as a client (versions {'checked' if doc['versions']['checked'] else 'not published'});"
                              f" use --address {doc['address']} with duet run / runs / status")
                else:
                    con.print(f"joined {a.address} as {a.role}; actor {doc['actor']}")
        else:
            doc = {"stopped": two_host.stop(all_nodes=a.all)}
            if not a.json:
                con.print(f"stopped: {', '.join(doc['stopped']) or 'nothing (no node duet started is running)'}")
    except two_host.VersionMismatch as exc:
        print_error(exc)
        return EXIT_REFUSED
    except (ServiceError, TimeoutError, ConnectionError) as exc:
        print_error(exc)
        return EXIT_INFRA
    except (ValueError, FileNotFoundError) as exc:
        print_error(exc)
        return EXIT_INPUT
    if a.json:
        emit_json(doc)
    return EXIT_OK


