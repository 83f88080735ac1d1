"""`duet dashboard`: the web view of runs, datasets, sessions and the cluster (cluster/web/)."""

from __future__ import annotations

import argparse
import os

from cluster.cli.common import workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, emit_json, int_arg


def setup_dashboard(p):
    workspace_arg(p)
    p.add_argument("--bind", default="127.0.0.1", help="the address to serve on (default 127.0.0.1; a LAN/VPN IP "
                                                       "to reach it from another machine)")
    p.add_argument("--port", type=int_arg(1, 65535), help="default: the first free port from 8750")
    p.add_argument("--address", help="the cluster's head HOST:PORT or ray://HOST:PORT (default: the one duet knows)")
    p.add_argument("--allow-all-interfaces", action="store_true", help="allow --bind 0.0.0.0")
    p.add_argument("--url", action="store_true",
                   help="print the login URL of the dashboard `duet up --dashboard` started here, and exit")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # a background child: no token in its log
    p.add_argument("--json", action="store_true", help="print {url, login_url} as JSON, then serve")


def run_dashboard(a) -> int:
    from cluster import addresses, embedded
    from cluster.web import server
    from infra.services import ServiceError, StateFile

    con = console()
    if a.url:
        known = StateFile(embedded.state_dir(a.workspace)).read().get(server.STATE_KEY)
        if not known:
            print_error(f"no dashboard recorded for {os.path.abspath(a.workspace)}: `duet up --dashboard` or `duet dashboard`")
            return EXIT_INFRA
        doc = {"url": known["url"], "login_url": server.login_url(known["bind"], known["port"]), "pid": known["pid"]}
        emit_json(doc) if a.json else con.print(doc["login_url"], markup=False, highlight=False, soft_wrap=True)
        return EXIT_OK
    try:
        a.bind = addresses.check_bind(a.bind, a.allow_all_interfaces)
        port = server.pick_port(a.bind, a.port)
    except ValueError as exc:
        print_error(exc)
        return EXIT_INPUT
    except (ServiceError, OSError) as exc:
        print_error(exc)
        return EXIT_INFRA
    url = server.login_url(a.bind, port)
    if a.json:
        emit_json({"url": f"http://{server.url_host(a.bind)}:{port}/", "login_url": url,
                   "workspace": os.path.abspath(a.workspace)})
    elif not a.quiet:
        con.print(f"duet dashboard for {os.path.abspath(a.workspace)}: open\n  {url}\n"
                  "(the link logs this browser in; Ctrl-C stops the dashboard, the cluster and its runs go on)",
                  markup=False, highlight=False, soft_wrap=True)
    rc = server.serve(a.workspace, bind=a.bind, port=port, address=a.address)
    if rc:
        print_error(f"the dashboard could not serve on {a.bind}:{port} (exit {rc}); see the messages above")
        return EXIT_INFRA
    return EXIT_OK
