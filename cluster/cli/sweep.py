"""duet sweep CONFIG --grid KEY=V1,V2 [--grid ...] | duet sweep show ID: a grid of runs on one dataset,
then a comparison (roles/sweep.py) committed to the workspace with the best run named.

Every grid point is validated before the first run starts. The runs share one dataset version; each
is planned for every executor and queued on the head, whose scheduler spreads them over the idle
executors they fit, at most --max-parallel at a time. A run that fails is shown as failed, and the
others go on.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from pathlib import Path

from cluster.cli.common import workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INPUT, EXIT_OK, EXIT_REFUSED, emit_json, int_arg


def setup_sweep(p):
    p.add_argument("config", help="a run config (as for `duet run`), or `show` to print a sweep")
    p.add_argument("sweep_id", nargs="?", help="with `show`: the sweep's id")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a training field and its values; several --grid flags make a grid (lora.r=8,16 too)")
    p.add_argument("--max-parallel", type=int_arg(1, 64), default=1,
                   help="runs at a time (bounded by the executors: each executor trains one run at a time)")
    p.add_argument("--on", metavar="NODE", help="run every point on this executor node only (name, IP or hostname)")
    p.add_argument("--address", help="a two-host cluster's head HOST:PORT")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def _show(a) -> int:
    if not a.sweep_id:
        print_error("duet sweep show needs a SWEEP_ID")
        return EXIT_INPUT
    from training.config import RUN_ID

    if not RUN_ID.fullmatch(a.sweep_id) or ".." in a.sweep_id:
        print_error(f"sweep id {a.sweep_id!r}: not a sweep name")
        return EXIT_INPUT
    d = Path(a.workspace) / "sweeps" / a.sweep_id
    if not (d / "comparison.json").is_file():
        known = sorted(x.name for x in (Path(a.workspace) / "sweeps").glob("*/comparison.json")) if \
            (Path(a.workspace) / "sweeps").is_dir() else []
        print_error(f"no sweep {a.sweep_id!r} in {a.workspace} (known: {', '.join(known) or 'none'})")
        return EXIT_INPUT
    from cluster.output import terminal_safe
    from infra import safe_files

    try:  # inside the workspace only: a comparison that is a symlink out of it is refused
        if a.json:
            emit_json(safe_files.read_json(a.workspace, d / "comparison.json"))
        else:
            console().print(terminal_safe(safe_files.read_text(a.workspace, d / "comparison.md")), markup=False,
                            highlight=False)
    except (OSError, ValueError) as exc:
        print_error(f"sweep {a.sweep_id}: {exc}")
        return EXIT_REFUSED
    return EXIT_OK


def run_sweep(a) -> int:
    if a.config == "show":
        return _show(a)
    from cluster import embedded, two_host
    from cluster.console import RichReporter
    from cluster.demo import run_points
    from roles import sweep
    from roles.architect import record_sweep
    from training.config import PlanError, load_run_config

    con = console()
    try:
        rc, data, cfg = load_run_config(a.config)
        points = sweep.expand(sweep.parse_grid(a.grid), rc.preset, rc.overrides)
    except (PlanError, sweep.SweepError) as exc:
        print_error(exc)
        return EXIT_INPUT
    sweep_id = f"{cfg.name}-sweep-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    address = two_host.cluster_address(a.workspace, a.address) if a.address or \
        any(v["alive"] for v in two_host.local_nodes().values()) else None
    from cluster.demo import DemoError
    from roles.pipeline import QuietReporter

    try:
        runs = run_points(a.workspace, rc, data, points, sweep_id, address=address, max_parallel=a.max_parallel,
                          on=a.on, reporter=QuietReporter() if a.json else RichReporter())
    except DemoError as exc:
        print_error(exc)
        return exc.code
    for r in runs:
        if r.get("error"):
            print_error(f"sweep {sweep_id} {r['error']}")
    comparison = sweep.compare(sweep_id, runs)
    pg, mongo = embedded.store_urls(a.workspace)
    comparison["recorded"] = record_sweep(os.fspath(a.workspace), pg, mongo, comparison)
    if a.json:
        emit_json(comparison)
    else:
        con.print(sweep.markdown(comparison), markup=False, highlight=False)
        con.print(f"recorded in {comparison['recorded']['path']}; `duet sweep show {sweep_id}` prints it again")
    return EXIT_OK if comparison["best"] else EXIT_INPUT
