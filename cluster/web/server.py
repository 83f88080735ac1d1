"""Serving the dashboard: in the foreground (``duet dashboard``), or as a background process that
``duet up --dashboard`` / ``duet node start --head --dashboard`` start and ``duet down`` / ``duet node
stop`` stop by PID (recorded in a ``services.json`` like every service duet starts).

Bound to 127.0.0.1 unless told; 0.0.0.0 (or ::) only with --allow-all-interfaces. The login URL
carries the dashboard token (cluster/web/auth.py) and is printed, never written to a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster import auth as cluster_auth
from cluster.web import auth
from infra import services

DEFAULT_PORT = 8750
PORTS = range(DEFAULT_PORT, DEFAULT_PORT + 50)   # outside Ray's worker ports (10002-19999)
STATE_KEY = "dashboard"


def keys() -> auth.Keys:
    path, _ = cluster_auth.ensure_token()
    return auth.Keys.from_token_file(path)


def sessions() -> auth.Sessions:
    """The dashboards' server-side sessions, beside the cluster token (private)."""
    cluster_auth.ensure_token()
    return auth.Sessions(cluster_auth.config_dir() / "dashboard_sessions.json")


def url_host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind


def login_url(bind: str, port: int, k: auth.Keys | None = None) -> str:
    host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
    return f"http://{url_host(host)}:{port}/login?token={(k or keys()).login_token}"


def pick_port(bind: str, port: int | None) -> int:
    """``port`` when given (ServiceError when taken), else the first free one from DEFAULT_PORT."""
    if port:
        if not services.port_free(port, bind):
            raise services.ServiceError(f"port {port} on {bind} is taken (another dashboard?); pass --port")
        return port
    return services.free_port(PORTS, bind)


def serve(workspace: str | os.PathLike, *, bind: str, port: int, address: str | None = None) -> int:
    """Serve until interrupted (blocking), in a child process that is started again when it dies.

    The child is a Ray driver of the cluster, and Ray ends a driver whose head has been gone for a
    minute (a GPU host rebooting); the restarted child shows what the workspace holds until the head
    answers again, then connects. The browser's live streams reconnect by themselves and the session
    cookie stays valid. A child that fails at once three times in a row (a taken port) ends it."""
    import signal
    import time

    cmd = [sys.executable, "-m", "cluster.web.server", "--workspace", str(workspace), "--bind", bind,
           "--port", str(port)] + (["--address", address] if address else [])
    stopping = {"sig": None}
    child = {"proc": None}

    def on_signal(sig, _frame):
        stopping["sig"] = sig
        if child["proc"] is not None and child["proc"].poll() is None:
            child["proc"].send_signal(signal.SIGINT)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    quick_failures = 0
    while True:
        started = time.time()
        child["proc"] = subprocess.Popen(cmd, env=_child_env(), preexec_fn=_die_with_parent)
        rc = child["proc"].wait()
        if stopping["sig"] is not None or rc == 0:
            return 0
        quick_failures = quick_failures + 1 if time.time() - started < 5 else 0
        if quick_failures >= 3:
            return rc or 1
        sys.stderr.write(f"duet dashboard: the server exited ({rc}); starting it again\n")
        time.sleep(1.0)


def _child_env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _die_with_parent() -> None:
    """The server ends with its supervisor, even a killed one (Linux; elsewhere it is stopped by SIGTERM)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_app(workspace: str | os.PathLike, *, bind: str, port: int, address: str | None = None) -> None:
    """The server itself: uvicorn with the dashboard app, until SIGINT/SIGTERM."""
    import uvicorn

    from cluster.web.app import create_app
    from cluster.web.source import Source

    cluster_auth.apply_auth_env()  # before anything imports ray
    app = create_app(Source(workspace, address), keys(), bind=bind, port=port, sessions=sessions())
    uvicorn.Server(uvicorn.Config(app, host=bind, port=port, log_level="warning", access_log=False,
                                  timeout_graceful_shutdown=2, lifespan="off")).run()


def start_background(state_dir: str | os.PathLike, workspace: str | os.PathLike, *, bind: str = "127.0.0.1",
                     port: int | None = None, address: str | None = None, key: str = STATE_KEY) -> dict:
    """Start (or reuse) a dashboard process for ``workspace``; recorded under ``key`` in
    ``<state_dir>/services.json``. Returns {pid, port, url (no token), login_url}."""
    state = services.StateFile(state_dir)
    known = state.read().get(key)
    if known and services.pid_alive(known["pid"]) and services.port_open(known["port"], known.get("bind", bind)):
        return {**known, "login_url": login_url(known.get("bind", bind), known["port"]), "reused": True}
    port = pick_port(bind, port)
    log = Path(state_dir) / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cluster.cli", "dashboard", "--workspace", str(Path(workspace).resolve()),
           "--bind", bind, "--port", str(port), "--quiet"] + (["--address", address] if address else []) \
        + (["--allow-all-interfaces"] if bind in ("0.0.0.0", "::") else [])
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=_child_env())
    services.wait_port(port, proc.pid, "the dashboard", log, host=bind if bind not in ("0.0.0.0", "::") else "127.0.0.1")
    info = {"name": "dashboard", "pid": proc.pid, "port": port, "bind": bind,
            "url": f"http://{url_host(bind)}:{port}/", "workspace": str(Path(workspace).resolve())}
    state.update(key, info)
    return {**info, "login_url": login_url(bind, port), "reused": False}


def stop_background(state_dir: str | os.PathLike, key: str = STATE_KEY) -> bool:
    return services.stop_recorded(state_dir, key)


if __name__ == "__main__":  # the supervised child of serve()
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cluster.web.server")
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--address")
    a = ap.parse_args()
    try:
        run_app(a.workspace, bind=a.bind, port=a.port, address=a.address)
    except KeyboardInterrupt:  # Ctrl-C (uvicorn raises it again once it has shut down): a clean stop
        sys.exit(0)
