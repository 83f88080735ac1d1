"""`duet status`: the cluster's nodes (role, address, alive, GPUs, memory), its actors and where they
live, every executor's hardware and run, and the queue."""

from __future__ import annotations

from cluster import ray_node
from cluster.two_host import ROLES, local_nodes
from infra.lazy import lazy
from infra.services import port_open
from roles import names
from roles.client import call, scheduler_handle

ray = lazy("ray", extra="architect")


def status(address: str | None = None) -> dict:
    """Nodes (role, address, alive, GPUs, memory), actors and where they live, runs in progress."""
    local = local_nodes()
    if address is None:
        heads = [v for v in local.values() if v.get("role") == "head" and v["alive"]]
        workers = [v for v in local.values() if v["alive"] and v.get("head")]
        address = heads[0]["address"] if heads else (workers[0]["head"] if workers else None)
    doc: dict = {"local_nodes": local, "address": address, "nodes": [], "actors": [], "runs": []}
    if address is None:
        doc["error"] = "no cluster known on this machine: `duet node start --head` or `duet node join`"
        return doc
    host, port = address.removeprefix(ray_node.CLIENT_SCHEME).rsplit(":", 1)
    if not port_open(int(port), host):
        doc["error"] = f"the head at {address} does not answer"
        return doc
    ray_node.connect(address)
    from ray.util.state import list_actors

    for n in ray.nodes():
        res = n.get("Resources", {})
        role = [r for r in ROLES if res.get(r)]
        doc["nodes"].append({"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": n["Alive"],
                             "roles": role, "gpus": res.get("GPU", 0), "cpus": res.get("CPU", 0),
                             "memory_bytes": int(res.get("memory", 0))})
    try:
        for a in list_actors(filters=[("state", "=", "ALIVE")], timeout=10):
            if a.get("name", "").startswith("duet-"):
                if not a.get("node_id"):  # the state API has not placed it yet: ask the actor
                    try:
                        h = ray.get_actor(a["name"], namespace=names.NAMESPACE)
                        a = {**a, "node_id": call(h, "ping", timeout=10).get("node_id")}
                    except Exception:
                        pass
                node_addr = next((n["address"] for n in doc["nodes"] if n["node_id"] == a.get("node_id")), None)
                doc["actors"].append({"name": a["name"], "node_id": a.get("node_id"), "address": node_addr,
                                      "pid": a.get("pid")})
    except Exception as exc:  # the state API needs the dashboard agent; degrade, do not fail
        from roles.client import find_executors

        for name in [*find_executors(), names.ARCHITECT_NAME, names.SCHEDULER_NAME]:
            try:
                h = ray.get_actor(name, namespace=names.NAMESPACE)
                info = call(h, "ping", timeout=10)
                addr = next((n["address"] for n in doc["nodes"] if n["node_id"] == info.get("node_id")), None)
                doc["actors"].append({"name": name, "node_id": info.get("node_id"), "address": addr,
                                      "pid": info.get("pid")})
            except Exception:
                pass
        doc["actors_note"] = f"via ping ({type(exc).__name__})"
    _executors_status(doc)
    return doc


def _executors_status(doc: dict) -> None:
    """Every executor: its node, hardware (GPU, free/total memory), the run it trains; and the queue."""
    from roles.client import find_executors, owned, placements
    from roles.queue import TERMINAL, free_bytes

    doc["executors"] = []
    placed = placements(scheduler_handle())
    for n, ex in find_executors().items():
        row = {"name": n, "node": names.node_of(n), "runs": []}
        try:
            info, hw, runs = (call(ex, m, timeout=20) for m in ("ping", "probe", "list"))
        except Exception as exc:
            row["error"] = f"not answering ({type(exc).__name__}): its node is down or restarting"
            doc["executors"].append(row)
            continue
        total = hw["gpu_total_bytes"] if hw.get("device") == "cuda" else hw.get("ram_total_bytes")
        row.update(ip=info.get("ip"), host=info.get("host"), device=hw.get("device"), gpu=hw.get("gpu_name"),
                   torch=hw.get("torch_version"), cuda=hw.get("cuda_version"), bf16=hw.get("bf16"),
                   free_bytes=free_bytes(hw), total_bytes=total,
                   exporter={"port": info.get("metrics_port"),
                             "reachable": bool(info.get("metrics_port")) and port_open(info["metrics_port"], "127.0.0.1")})
        for r in owned(n, runs, placed):
            r["node"] = row["node"]
            if r["state"] not in TERMINAL:
                snap = call(ex, "status", r["run_id"], 10**9, timeout=10)
                r["eta_s"] = snap["progress"].get("eta_s")
                row["training"] = r["run_id"]
            doc["runs"].append(r)
        doc["executors"].append(row)
        if n == names.EXECUTOR_NAME:
            doc["exporter"] = row["exporter"]
    if not doc["executors"]:
        doc["executor_error"] = "the cluster has no executor actor"
    sched = scheduler_handle()
    try:
        doc["queue"] = [e for e in call(sched, "list", timeout=10) if e["state"] in ("queued", "running")] \
            if sched is not None else []
    except Exception as exc:
        doc["queue_error"] = f"{type(exc).__name__}: {exc}"[:300]
