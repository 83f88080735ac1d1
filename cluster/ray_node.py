"""Ray node lifecycle: start a node with duet's role resources, stop it by PID.

A node is ``ray start --block`` run as a child in its own process session; duet records its PID
(plus its temp dir) in ``<state_dir>/services.json``. Stopping sends SIGTERM to that PID (Ray then
stops the node's own processes) and sweeps any process left that names the node's temp dir.
``ray stop`` is never used: it kills every Ray process on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cluster import auth
from infra.services import ServiceError, StateFile, pid_alive, port_open, stop_pid
from roles.names import NAMESPACE
from infra.lazy import lazy

ray = lazy("ray", extra="architect")

DEFAULT_HEAD_PORT = 6390


@dataclass
class NodeInfo:
    role: str
    pid: int
    address: str
    temp_dir: str
    resources: dict
    head: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def ray_env() -> dict[str, str]:
    """Environment for Ray processes: token auth, quick failure detection, no usage stats."""
    env = dict(os.environ)
    env.update(auth.auth_env())
    env.pop("RAY_AUTH_TOKEN", None)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Notice a dead node in ~3 s rather than Ray's default ~30 s.
    env.setdefault("RAY_health_check_period_ms", "1000")
    env.setdefault("RAY_health_check_failure_threshold", "3")
    env.setdefault("RAY_health_check_timeout_ms", "1000")
    # Ray processes only fork to exec. With gRPC's fork handlers on (this grpcio's default), the Ray
    # Client proxy's fork of a per-client server crashes (SIGSEGV) when another thread is inside gRPC,
    # which on a fresh head is most first connections (ray-project/ray#63202). Off, as gRPC advises
    # for fork+exec.
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    # Ray starts its workers at nice 15, and a run's training process (and a data-parallel rank) is one
    # of them or its child: on a busy host every Ray daemon and the actor's own threads then preempt the
    # training (measured with the embedded cluster up: duet's step 1.35x a plain script's, issue 37).
    # Workers at the normal priority, as a plain script or torchrun runs.
    env.setdefault("RAY_worker_niceness", "0")
    # A node's background work comes out of a training step on a small host (2 cores: a step 1.06x a
    # plain script's with the cluster up, issue 37). What duet does not use is off: idle Python workers
    # kept warm for tasks (duet starts actors; each idle worker wakes ~100 times a second), per-task
    # event reports, the event loops' own statistics. With QUIET_FLAGS' log monitor off, the embedded
    # cluster's processes idle with an executor: 3.2 -> 1.7 s of CPU a minute, 640 -> 450 wake-ups a second
    # (2-core EPYC).
    env.setdefault("RAY_prestart_worker_first_driver", "0")
    env.setdefault("RAY_num_workers_soft_limit", "0")
    env.setdefault("RAY_task_events_report_interval_ms", "0")
    env.setdefault("RAY_event_stats", "0")
    return env


# the log monitor polls every worker's log files ten times a second to stream them to drivers, which
# duet connects with log_to_driver=False; the logs stay in the node's temp dir
QUIET_FLAGS = ("--include-log-monitor=false",)


def short_temp_dir(key: str) -> str:
    """Ray's socket paths must stay under ~107 bytes: keep the temp dir short and per-node."""
    return f"/tmp/duet-ray-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def start_head(state_dir: str | os.PathLike, *, resources: dict, ip: str = "127.0.0.1",
               port: int = DEFAULT_HEAD_PORT, num_cpus: int | None = None, timeout: float = 90,
               key: str = "head", num_gpus: int | None = None, dashboard: bool = False,
               client_port: int | None = None) -> NodeInfo:
    """Start (or reuse) a Ray head node recorded under ``key`` in the state file."""
    state = StateFile(state_dir)
    known = state.read().get(key)
    if known and pid_alive(known["pid"]):
        host, p = known["address"].rsplit(":", 1)
        if port_open(int(p), host):
            return NodeInfo(**known)
        stop_node(state_dir, key)
    temp_dir = short_temp_dir(f"{Path(state_dir).resolve()}:{key}")
    log = Path(state_dir) / f"ray-{key}.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--node-ip-address={ip}",
           f"--port={port}", f"--resources={json.dumps(resources)}",
           f"--include-dashboard={'true' if dashboard else 'false'}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block", *QUIET_FLAGS]
    if dashboard:
        cmd.append(f"--dashboard-host={ip}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if client_port:  # Ray Client server on the node's own address, for design hosts that cannot join
        cmd.append(f"--ray-client-server-port={client_port}")
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ray_env(), start_new_session=True)
    info = NodeInfo("head", proc.pid, f"{ip}:{port}", temp_dir, resources)
    state.update(key, info.to_dict())
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pid_alive(proc.pid):
            state.update(key, None)
            raise ServiceError(f"the Ray head exited during start; see {log}:\n{_tail(log)}")
        if port_open(port, ip) and "--block" in _tail(log):
            return info
        time.sleep(0.25)
    stop_node(state_dir, key)
    raise ServiceError(f"the Ray head did not start within {timeout:.0f} s; see {log}")


def start_worker(state_dir: str | os.PathLike, *, head: str, resources: dict, ip: str, key: str,
                 timeout: float = 30, num_gpus: int | None = None) -> NodeInfo:
    """Join ``head`` as a worker node; give up after ``timeout`` (a join to a dead head hangs)."""
    import psutil

    state = StateFile(state_dir)
    known = state.read().get(key)
    if known and pid_alive(known["pid"]):
        return NodeInfo(**known)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    log = Path(state_dir) / f"ray-{key}.log"
    log.write_text("")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head}", f"--node-ip-address={ip}",
           f"--resources={json.dumps(resources)}", "--disable-usage-stats", "--block", *QUIET_FLAGS]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=ray_env(), start_new_session=True)
    deadline = time.time() + timeout
    temp_dir = ""
    while time.time() < deadline:
        if not pid_alive(proc.pid):
            raise ServiceError(f"joining {head} failed; see {log}:\n{_tail(log)}")
        if "--block" in _tail(log):
            # The worker's processes name the session dir; remember it to sweep leftovers on stop.
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    for arg in child.cmdline():
                        if "session_" in arg and "/sockets/" in arg:
                            temp_dir = arg.split("=", 1)[-1].split("/sockets/")[0]
                            break
                except psutil.Error:
                    pass
                if temp_dir:
                    break
            info = NodeInfo("worker", proc.pid, ip, temp_dir or f"/nonexistent-{key}", resources)
            d = info.to_dict()
            d["head"] = head
            state.update(key, d)
            return info
        time.sleep(0.25)
    stop_pid(proc.pid)
    raise ServiceError(f"joining {head} did not finish within {timeout:.0f} s (is the head reachable, and the "
                       f"token the head's?); see {log}")


def stop_node(state_dir: str | os.PathLike, key: str = "head", drain_s: float = 5) -> bool:
    """SIGTERM the node's ``ray start --block`` (Ray drains, then stops the node's processes); after
    ``drain_s`` (Ray would wait 30 s) kill what is left of it: its descendants, and orphans that name
    its temp dir and (for a worker) its address. A run loses at most one checkpoint interval."""
    import psutil

    state = StateFile(state_dir)
    all_nodes = state.read()
    known = all_nodes.get(key)
    if not known:
        return False
    mine = _descendants(known["pid"])
    stop_pid(known["pid"], timeout=drain_s)
    others = set()
    for k, v in all_nodes.items():
        if k != key and pid_alive(v["pid"]):
            others |= _descendants(v["pid"]) | {v["pid"]}
    for pid in mine:
        if pid not in others:
            _kill(pid)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] in others or proc.info["pid"] == os.getpid() or known["temp_dir"] not in cmd:
                continue
            if known["role"] == "worker" and f"={known['address']}" not in cmd:
                continue
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    state.update(key, None)
    return True


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


CLIENT_SCHEME = "ray://"


def is_client(address: str | None) -> bool:
    """``ray://HOST:PORT``: the head's Ray Client server (a design host that cannot join as a node)."""
    return bool(address) and address.startswith(CLIENT_SCHEME)


def connect(address: str, timeout: float = 30) -> None:
    """Connect this process to the cluster as a driver, with the token, in duet's namespace.

    Ray reads RAY_AUTH_MODE when it is imported: call ``auth.apply_auth_env()`` (or this) before
    anything imports ray.
    """
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_MODE") != "token":
        raise RuntimeError("ray was imported before duet set RAY_AUTH_MODE=token; call "
                           "cluster.auth.apply_auth_env() first")
    auth.apply_auth_env()

    if ray.is_initialized():
        return
    host, port = address.removeprefix(CLIENT_SCHEME).rsplit(":", 1)
    if not port_open(int(port), host, timeout=min(timeout, 5)):
        raise ServiceError(f"no Ray cluster answers at {address}; start one with `duet up` or "
                           "`duet node start --role executor --head`")
    if is_client(address):  # a driver only, through the head's Ray Client server (no node here)
        ray.init(address, namespace=NAMESPACE, logging_level="ERROR")
        return
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
