"""`duet infra up|down|status` and `duet watch RUN`."""

from __future__ import annotations

import time

from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, EXIT_REFUSED, float_arg, int_arg
from cluster.console import print_error
from infra.lazy import lazy
from roles.client import call
from infra.run_states import ended

ray = lazy("ray", extra="architect")

SPARK = "▁▂▃▄▅▆▇█"


def setup_infra(p):
    from cluster.cli.common import workspace_arg as _workspace_arg

    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--exporter", action="append", metavar="[NODE=]HOST:PORT",
                   help="an executor's exporter to scrape, labelled with its node; repeat it for each executor "
                        "(default: 127.0.0.1:9108)")
    p.add_argument("--prometheus-port", type=int_arg(1, 65535), default=9490)
    p.add_argument("--alertmanager-port", type=int_arg(1, 65535), default=9493)
    p.add_argument("--webhook-port", type=int_arg(1, 65535), default=9497, help="duet's alert receiver")
    p.add_argument("--webhook", help="send alerts to this URL instead of duet's receiver")
    p.add_argument("--json", action="store_true")
    _workspace_arg(p)


def run_infra(a) -> int:
    from cluster.console import console as _console
    from cluster.output import emit_json
    from infra import monitoring
    from infra.services import ServiceError

    import re

    con = _console()
    exporters = a.exporter or ["127.0.0.1:9108"]
    for e in exporters:
        if not re.fullmatch(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}=)?(?:[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}|"
                            r"\[[0-9A-Fa-f:]{2,45}\]:[0-9]{1,5})", e):
            print_error(f"--exporter {e!r}: give [NODE=]HOST:PORT, e.g. 127.0.0.1:9108 or gpu-b=10.0.0.3:9108")
            return EXIT_INPUT
    if a.webhook is not None and not re.fullmatch(r"https?://[^\s'\"\\<>{}]{1,2000}", a.webhook):
        print_error(f"--webhook {a.webhook!r}: give an http(s) URL, e.g. http://127.0.0.1:9000/alerts")
        return EXIT_INPUT
    try:
        if a.action == "up":
            doc = monitoring.up(a.workspace, exporter=exporters, webhook=a.webhook,
                                ports={"prometheus": a.prometheus_port, "alertmanager": a.alertmanager_port,
                                       "receiver": a.webhook_port})
        elif a.action == "down":
            doc = {"stopped": monitoring.down(a.workspace)}
        else:
            doc = monitoring.status(a.workspace)
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA
    if a.json:
        emit_json(doc)
    elif a.action == "down":
        con.print(f"stopped: {', '.join(doc['stopped']) or 'nothing'}")
    else:
        for name, v in doc["services"].items():
            con.print(f"{name:<13} pid {v['pid']:<8} {v['url']}  {'up' if v['alive'] and v['reachable'] else 'DOWN'}")
        if not doc["services"]:
            con.print("not running: `duet infra up`")
        for t in doc.get("targets", []):
            con.print(f"scrape {t['url']}: {t['health']}")
        for al in doc.get("alerts", []):
            con.print(f"alert {al['name']} {al['state']} {al['labels'].get('run_id', '')}")
        con.print(f"alerts received by the webhook: {doc['received']}")
    return EXIT_OK


def setup_watch(p):
    from cluster.cli.common import workspace_arg as _workspace_arg

    p.add_argument("run_id")
    p.add_argument("--address", help="the cluster's head HOST:PORT or ray://HOST:PORT (default: the one duet knows)")
    p.add_argument("--once", action="store_true", help="one snapshot, then exit")
    p.add_argument("--interval", type=float_arg(0.05, 3600), default=1.0)
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    _workspace_arg(p)


def sparkline(values: list[float], width: int = 48) -> str:
    vals = [v for v in values if v == v][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1)))] for v in vals)


def render(snap: dict):
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    p = snap["progress"]
    t = Table.grid(padding=(0, 2))
    t.add_column(justify="right", style="bold")
    t.add_column()
    eta = f"ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None else ""
    t.add_row("run", f"{snap['run_id']}  [{snap['state']}]  step {p['step']}/{p['max_steps']}  {eta}")
    t.add_row("", ProgressBar(total=max(1, p["max_steps"] or 1), completed=p["step"] or 0, width=50))
    losses = [x[1] for x in snap["losses"]]
    t.add_row("loss", f"{sparkline(losses)}  {losses[-1]:.4f}" if losses else "-")
    ev = [x[1] for x in snap["eval_losses"]]
    t.add_row("eval loss", f"{sparkline(ev)}  {ev[-1]:.4f}" if ev else "-")
    t.add_row("tokens/s", f"{p['tokens_per_second']:.0f}" if p.get("tokens_per_second") else "-")
    t.add_row("lr / grad", f"{p.get('learning_rate') or 0:.2e} / {p.get('grad_norm') or 0:.3g}")
    gpu = (snap.get("watchdog") or {}).get("gpu")
    mem = f"executor RSS {snap['process_rss_bytes'] / 2**30:.2f} GiB"
    if gpu:
        if gpu.get("process_memory_bytes") is not None:
            mem += f"; GPU (duet) {gpu['process_memory_bytes'] / 2**30:.1f}"
        mem += f"; GPU card {gpu['memory_used_bytes'] / 2**30:.1f}/{gpu['memory_total_bytes'] / 2**30:.1f} GiB"
        if gpu.get("temperature_c") is not None:
            t.add_row("temperature", f"{gpu['temperature_c']:.0f} C")
    t.add_row("memory", mem)
    active = (snap.get("watchdog") or {}).get("active") or []
    t.add_row("alerts", ", ".join(active) or "none active")
    for a in snap["alerts"][-5:]:
        what = a.get("rule") or a["event"]
        t.add_row("", f"{time.strftime('%H:%M:%S', time.localtime(a['time']))} {what}: {a.get('message', a.get('reason', ''))}")
    if snap.get("error"):
        t.add_row("error", snap["error"])
    return Group(t)


def run_watch(a) -> int:
    from rich.console import Console
    from rich.live import Live

    from cluster import two_host
    from cluster.output import emit_json
    from infra.services import ServiceError

    try:
        ex = two_host.executor_handle(a.workspace, a.address, run_id=a.run_id)
    except ServiceError as exc:
        print_error(exc)
        return EXIT_INFRA

    def snap():
        return call(ex, "watch", a.run_id, timeout=30)

    try:
        first = snap()
    except ray.exceptions.RayTaskError as exc:
        print_error(getattr(exc, 'cause', exc))
        return EXIT_INPUT
    if a.once:
        if a.json:
            emit_json(first)
        else:
            Console().print(render(first))
        return EXIT_OK
    out = Console()
    with Live(render(first), console=out, refresh_per_second=4) as live:
        s = first
        while not ended(s["state"]):
            time.sleep(a.interval)
            try:
                s = snap()
            except Exception as exc:  # the executor went away: say so and keep trying
                live.update(f"executor unreachable ({type(exc).__name__}); retrying ...")
                continue
            live.update(render(s))
    return EXIT_OK if s["state"] == "finished" else EXIT_REFUSED if s["state"] == "cancelled" else EXIT_INPUT
