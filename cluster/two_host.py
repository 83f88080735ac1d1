"""Two-host clusters: the GPU host starts the head (executor role), the design host joins (architect
role) or connects as a client. Nodes duet started are recorded in ``<config dir>/nodes.json`` and
stopped by PID (never ``ray stop``).

Versions: the head publishes its Python, Ray and duet versions in Ray's internal KV
(``duet:versions``); a joining host reads them through a bare GCS client first and refuses with
both versions named when they differ (Ray's own error for this is obscure). The test facility
``DUET_VERSION_OVERRIDES='{"ray": "2.59.0"}'`` changes what this host reports, so a mismatch can be
simulated without installing a second Ray.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from cluster import auth, ray_node
from cluster.addresses import check_bind
from roles import names
from infra.services import ServiceError, StateFile, pid_alive, port_open, stop_recorded
from infra.lazy import lazy
from roles.client import call

ray = lazy("ray", extra="architect")

KV_KEY = b"duet:versions"
KV_NAMESPACE = b"duet"
ROLES = ("executor", "architect")


class VersionMismatch(RuntimeError):
    pass


def state_dir() -> Path:
    return auth.config_dir() / "nodes"


def local_versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "ray": md.version("ray"), "duet": md.version("duet")}
    override = os.environ.get("DUET_VERSION_OVERRIDES")
    if override:
        v.update(json.loads(override))
    return v


def detect_gpus() -> int:
    """GPUs for Ray's num_gpus, from nvidia-smi (which ships with the driver CUDA needs): no torch import,
    so a node starts fast."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        return 0


def join_command(address: str, token_file: Path) -> str:
    return (f"duet node join --role architect --address {address} --token-file {token_file}  "
            f"# copy {token_file} to the design host first (keep it mode 0600)")


def start_head(*, role: str = "executor", bind: str = "127.0.0.1", port: int = ray_node.DEFAULT_HEAD_PORT,
               data_dir: str | None = None, workspace: str | None = None, dashboard: bool = False,
               allow_all: bool = False, metrics_port: int | None = 9108, key: str | None = None,
               client_port: int | None = None) -> dict:
    """Start the head with the role's resource, publish versions, create the role's actor.

    ``client_port``: also serve Ray Client there (default: ``port + 1``; 0 turns it off), so a design
    host that cannot join as a node drives the cluster with ``--address ray://BIND:CLIENT_PORT``."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    bind = check_bind(bind, allow_all)
    from roles.queue import QueueError, RunQueue

    queue_path = Path(data_dir or default_data_dir()).resolve() / "queue.json"
    try:
        RunQueue(queue_path)  # a damaged queue file is named now, before the head starts, not as a dead actor
    except QueueError as exc:
        raise ValueError(str(exc)) from exc
    key = key or f"head-{bind}-{port}"
    known = StateFile(state_dir()).read().get(key)
    if role == "executor" and not (known and pid_alive(known["pid"])):  # a head already up is reused as it is
        check_executor_free(metrics_port, data_dir)
    token_file, created = auth.ensure_token()
    resources = {role: 1}
    gpus = detect_gpus()
    client_port = port + 1 if client_port is None else client_port
    info = ray_node.start_head(state_dir(), resources=resources, ip=bind, port=port, key=key,
                           num_gpus=gpus, dashboard=dashboard, client_port=client_port)
    address = info.address
    auth.apply_auth_env()

    ray_node.connect(address)
    alive_at = time.time()  # the node is in the cluster and takes work from here on
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(KV_KEY, json.dumps(local_versions()).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)
    actor = _create_role_actor(role, data_dir=data_dir, workspace=workspace, metrics_port=metrics_port)
    from roles.actors import scheduler_actor

    sched = call(scheduler_actor(str(queue_path)), "ping", timeout=180)  # the run queue lives on the head
    ray.shutdown()
    return {"node": info.to_dict(), "key": key, "address": address, "token_file": str(token_file), "queue": sched,
            "token_created": created, "gpus": gpus, "actor": actor, "alive_at": alive_at,
            "join": join_command(address, token_file),
            "client_address": f"{ray_node.CLIENT_SCHEME}{bind}:{client_port}" if client_port else None}


def _create_role_actor(role: str, *, data_dir: str | None, workspace: str | None, metrics_port: int | None,
                       node: str | None = None) -> dict:
    from roles.actors import architect_actor, executor_actor

    if role == "executor":
        dd = str(Path(data_dir).resolve()) if data_dir else str(default_data_dir())
        a = executor_actor(dd, metrics_port, node=node)
    else:
        if not workspace:
            return {"role": role, "created": False, "reason": "no --workspace given"}
        from roles.actors import recorder_actor

        ws = str(Path(workspace).resolve())
        from cluster import embedded

        pg, mongo = embedded.store_urls(ws)  # DUET_*_URL, else the stores `duet up` runs for this workspace
        info = _fresh(lambda: architect_actor(ws, pg, mongo, "architect node", detached=True))
        # the recorder: every run of this workspace that ended while this host was away lands now
        rec = _fresh(lambda: recorder_actor(ws, pg, mongo, info["node_id"]))  # the live one from here on
        # what ended while this host was away is in the workspace when the join returns
        try:
            recorded = [{k: r.get(k) for k in ("run_id", "commit", "path")}
                        for r in call(recorder_actor(ws, pg, mongo, info["node_id"]), "sweep", timeout=600)]
        except Exception as exc:  # the recorder goes on trying in its loop; the join itself succeeded
            recorded = [{"error": f"{type(exc).__name__}: {exc}"[:300]}]
        return {"role": role, "created": True, **info, "recorder": {"pid": rec["pid"], "workspace": rec["workspace"]},
                "recorded": recorded}
    return {"role": role, "created": True, **_ping(a)}


def _fresh(make, timeout: float = 60) -> dict:
    """Ping the actor ``make()`` gets or creates. This host's earlier actor (its node stopped moments
    ago) keeps its name until Ray has seen the node dead (seconds): while ``make`` returns that one,
    wait and ask again."""
    deadline = time.time() + timeout
    while True:
        try:
            return _ping(make())
        except ray.exceptions.ActorDiedError:
            if time.time() >= deadline:
                raise
            time.sleep(1)


def _ping(actor, timeout: float = 180) -> dict:
    """The actor's ping, waiting while it is (re)starting: an executor whose node died restarts when its
    host rejoins, and resumes its runs in its constructor."""
    deadline = time.time() + timeout
    while True:
        try:
            return call(actor, "ping", timeout=max(1.0, deadline - time.time()))
        except ray.exceptions.ActorUnavailableError:
            if time.time() >= deadline:
                raise
            time.sleep(0.5)


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(os.environ.get("DUET_DATA_DIR") or os.path.join(base, "duet", "executor"))


def read_head_versions(address: str, timeout: float = 10) -> dict | None:
    """The head's published versions through a bare GCS client (works before joining)."""
    auth.apply_auth_env()
    from ray._raylet import GcsClient

    try:
        client = GcsClient(address=address)
        raw = client.internal_kv_get(KV_KEY, KV_NAMESPACE, timeout=timeout)
    except ray.exceptions.AuthenticationError as exc:
        raise ServiceError(f"the head at {address} refused this host's token ({auth.token_path()}): copy the "
                           "head's token file here and pass --token-file") from exc
    return json.loads(raw) if raw else None


def _version_diffs(mine: dict, theirs: dict) -> list[str]:
    return [f"{k}: {mine.get(k)} here, {theirs.get(k)} on the head" for k in ("python", "ray", "duet")
            if mine.get(k) != theirs.get(k)]


def check_versions(address: str) -> dict:
    mine = local_versions()
    theirs = read_head_versions(address)
    if theirs is None:
        return {"checked": False, "local": mine}
    diffs = _version_diffs(mine, theirs)
    if diffs:
        raise VersionMismatch("refusing to join: versions differ (Ray requires the same Python and Ray on every "
                              "node): " + "; ".join(diffs))
    return {"checked": True, "local": mine, "head": theirs}


def client_check(address: str, *, token_file: str | None = None, timeout: float = 30,
                 workspace: str | None = None) -> dict:
    """Connect as a Ray Client (no node here), compare versions with the head's, disconnect.

    ``address``: ``ray://HOST:PORT`` or ``HOST:PORT`` of the head's client port. ``workspace``: also
    copy into it every run of this host's that ended while it was away (recorded on the head's side)."""
    if token_file:
        auth.use_token_file(Path(token_file))
    if not ray_node.is_client(address):
        address = ray_node.CLIENT_SCHEME + address
    ray_node.connect(address, timeout=timeout)  # Ray Client itself refuses another Python or Ray version
    from ray.experimental import internal_kv

    try:
        raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        theirs = json.loads(raw) if raw else None
        executor_up = True
        try:
            ray.get_actor(names.EXECUTOR_NAME, namespace=names.NAMESPACE)
        except ValueError:
            executor_up = False
        diffs = _version_diffs(local_versions(), theirs) if theirs else []
        if diffs:
            raise VersionMismatch("refusing to drive this cluster: versions differ: " + "; ".join(diffs))
        recorded = client_catch_up(workspace) if workspace and executor_up else None
    finally:
        ray.shutdown()
    doc = {"client": True, "address": address, "executor": executor_up,
           "versions": {"checked": theirs is not None, "local": local_versions(), **({"head": theirs} if theirs else {})}}
    if recorded is not None:
        doc["recorded"] = recorded
    return doc


def client_workspace(workspace: str | os.PathLike) -> str:
    """The workspace on the head where a Ray-client design host's architect works (`client-workspaces/NAME`
    beside the head executor's data dir)."""
    info = call(ray.get_actor(names.EXECUTOR_NAME, namespace=names.NAMESPACE), "ping", timeout=120)
    return str(Path(info["data_dir"]).parent / "client-workspaces" / Path(workspace).resolve().name)


def client_catch_up(workspace: str | os.PathLike) -> list[dict]:
    """Copy into this client host's ``workspace`` the runs its head-side workspace has that ended."""
    from cluster import embedded
    from roles.client import RayExecutors, scheduler_handle
    from roles.recorder import catch_up

    sched = scheduler_handle()
    if sched is None:
        return []
    head_ws = client_workspace(workspace)
    return catch_up(str(Path(workspace).resolve()), *embedded.store_urls(workspace), call(sched, "list", timeout=60),
                    RayExecutors().fetch_record, lambda e: e.get("workspace") == head_ws)


def join(*, address: str, role: str = "architect", bind: str = "127.0.0.1", token_file: str | None = None,
         workspace: str | None = None, data_dir: str | None = None, timeout: float = 30,
         allow_all: bool = False, metrics_port: int | None = 9108, key: str | None = None,
         name: str | None = None) -> dict:
    """Join the head's cluster as a worker node with the role's resource (and create its actor).

    An executor node is named (``name``, default: its bind address): its actor is
    ``duet-executor:<name>``, and the node offers ``duet-node-<name>``, so that after the node dies Ray
    restarts the actor when this host joins again under the same name, and its runs resume here."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    bind = check_bind(bind, allow_all)
    node = names.check_node_name(name or bind) if role == "executor" else None
    warning = None
    if platform.system() == "Darwin":
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        warning = "Ray supports multi-node clusters on Linux only; this macOS node joins at your own risk"
    if token_file:
        auth.use_token_file(Path(token_file))
    host, port = address.rsplit(":", 1)
    if not port_open(int(port), host, timeout=min(timeout, 5)):
        raise ServiceError(f"no Ray head answers at {address} (is `duet node start --head` running there, and "
                           "is the port open on your LAN/VPN?)")
    versions = check_versions(address)
    key = key or f"{role}-{bind}"
    resources = {role: 1, **({names.node_resource(node): 1} if node else {})}
    if node:
        _check_free_name(address, node)
        check_executor_free(metrics_port, data_dir)
    info = ray_node.start_worker(state_dir(), head=address, resources=resources, ip=bind, key=key, timeout=timeout)

    ray_node.connect(address)
    actor = _create_role_actor(role, data_dir=data_dir, workspace=workspace, metrics_port=metrics_port, node=node)
    ray.shutdown()
    return {"node": info.to_dict(), "key": key, "address": address, "versions": versions, "actor": actor,
            "executor": names.executor_name(node) if node else None, "warning": warning}


def check_executor_free(metrics_port: int | None, data_dir: str | None) -> None:
    """Refuse, before any node starts, an executor whose metrics port is taken on this host or whose
    data dir another live executor uses (two executors on one machine need one of each apiece)."""
    import socket

    from training.run.run_files import data_dir_holder

    if metrics_port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", metrics_port))
            except OSError as exc:
                raise ValueError(f"port {metrics_port} (the executor's metrics exporter, 127.0.0.1:{metrics_port}) is "
                                 f"taken on this host ({exc.strerror}), e.g. by another executor: pass --metrics-port "
                                 "with a free port") from None
    dd = Path(data_dir).resolve() if data_dir else default_data_dir()
    holder = data_dir_holder(dd)
    if holder:
        raise ValueError(f"the data dir {dd} is used by a live executor ({holder}): pass --data-dir with a folder of "
                         "this executor's own")


def _check_free_name(address: str, node: str) -> None:
    """Refuse a second live node under an executor name that is taken (the same host rejoining after its
    node died is welcome: its old node is dead)."""
    ray_node.connect(address)
    try:
        res = names.node_resource(node)
        taken = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get(res)]
    finally:
        ray.shutdown()
    if taken:
        raise ValueError(f"executor node name {node!r} is taken by the live node {taken[0]}: pass --name")


def stop(*, all_nodes: bool = False, key: str | None = None) -> list[str]:
    """Stop the nodes duet started on this machine (by PID): one by key, else all of them."""
    st = StateFile(state_dir()).read()
    keys = [k for k in st if all_nodes or k == key] if (all_nodes or key) else _newest(st)
    keys.sort(key=lambda k: st[k].get("role") == "head")  # workers first: a head's exit would orphan them
    stopped = []
    for k in keys:
        if ray_node.stop_node(state_dir(), k):
            stopped.append(k)
        if stop_recorded(dashboard_state_dir(), f"dashboard-{k}"):  # `node start --dashboard` started it with the node
            stopped.append(f"dashboard-{k}")
    return stopped


def dashboard_state_dir() -> Path:
    """Where the dashboards that `duet node start --dashboard` started are recorded (by node key)."""
    return auth.config_dir() / "dashboards"


def _newest(st: dict) -> list[str]:
    """The node started last (by its process start time), among those still running."""
    import psutil

    started = {}
    for k, v in st.items():
        try:
            started[k] = psutil.Process(v["pid"]).create_time()
        except (psutil.Error, KeyError):
            continue
    return [max(started, key=started.get)] if started else []


def local_nodes() -> dict:
    st = StateFile(state_dir()).read()
    return {k: {**v, "alive": pid_alive(v["pid"])} for k, v in st.items()}


def cluster_address(workspace: str | os.PathLike, address: str | None = None) -> str | None:
    """--address, else the workspace's embedded head, else a node duet started on this machine."""
    from cluster import embedded

    if address:
        return address
    head = embedded.running(workspace).get("head")
    if head and head["alive"]:
        return head["address"]
    for v in local_nodes().values():
        if v["alive"]:
            return v.get("head") or v["address"]
    return None


def executor_handle(workspace: str | os.PathLike, address: str | None = None, run_id: str | None = None):
    """Connect to the cluster and return an executor actor: the one that holds ``run_id`` (the queue
    says where the scheduler started it; else each executor is asked), or the head's (ServiceError
    when there is none)."""
    address = cluster_address(workspace, address)
    if not address:
        raise ServiceError(f"no cluster runs for workspace {os.path.abspath(workspace)}: `duet up`, or "
                           "`duet node start/join`, or pass --address")
    ray_node.connect(address)
    from roles.client import find_executors

    exs = find_executors()
    if not exs:
        raise ServiceError("the cluster is up but has no executor actor (no run was submitted yet)")
    if run_id is None:
        return exs.get(names.EXECUTOR_NAME) or next(iter(exs.values()))
    from roles.client import scheduler_handle
    from roles.run_view import queue_entry

    entry = queue_entry(scheduler_handle(), run_id)
    if entry and entry.get("executor") in exs:
        return exs[entry["executor"]]
    for h in exs.values():
        try:
            if any(r["run_id"] == run_id for r in call(h, "list", timeout=30)):
                return h
        except Exception:
            continue
    return exs.get(names.EXECUTOR_NAME) or next(iter(exs.values()))  # its error names the runs it knows
