"""Where a run may go: one plan per executor, each designed for that executor's hardware; the runs it
fits go into the queue (roles/queue.py) and the scheduler starts them.

- ``executors_info``: every executor the cluster has, with its node, address and hardware.
- ``resolve_on``: ``--on NODE`` by node name, executor name, IP address or hostname.
- ``plan_everywhere``: the plans, and a refusal naming every executor's breakdown when none fits.
- ``wait_placed``: the queue entry once the scheduler has started it (or it ended first).
"""

from __future__ import annotations

import time

from infra.lazy import lazy
from roles import names
from roles.client import answering, call, find_executors

ray = lazy("ray", extra="architect")
GIB = 2**30


class PlacementError(RuntimeError):
    """A refusal with the CLI's exit code (1 input, 2 refused, 3 infrastructure)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def executors_info(timeout: float = 120) -> dict[str, dict]:
    """{executor name: {"handle", "node", "ping", "hardware"}} for the executors that answer now (one
    whose node is down takes no new runs until it is back)."""
    out = {}
    for n, h in answering(find_executors(), timeout=10).items():
        try:
            ping, hw = call(h, "ping", timeout=timeout), call(h, "probe", timeout=timeout)
        except Exception:
            continue  # a node that is down (its actor restarts when it rejoins) takes no new runs
        out[n] = {"handle": h, "node": names.node_of(n), "ping": ping, "hardware": hw}
    if not out:
        raise PlacementError("the cluster has no executor that answers: start one with `duet node start --head "
                             "--role executor` or `duet node join --role executor`", 3)
    return out


def resolve_on(on: str, infos: dict[str, dict]) -> str:
    """The executor ``--on`` names: its node ("head", "gpu-b"), its actor name, its IP or hostname."""
    hits = [n for n, i in infos.items()
            if on in (n, i["node"], i["ping"].get("ip"), i["ping"].get("host"), i["hardware"].get("hostname"))]
    if len(hits) != 1:
        known = ", ".join(f"{i['node']} ({i['ping'].get('ip')}, {i['hardware'].get('hostname')})"
                          for i in infos.values())
        why = "matches several executors" if hits else "is no executor of this cluster"
        raise PlacementError(f"--on {on}: {why}; executors: {known}", 1)
    return hits[0]


def breakdown(plan: dict) -> str:
    est = plan["estimate"]
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est["breakdown_bytes"].items() if v)
    return f"{est['total_bytes'] / GIB:.2f} GiB of {est['budget_bytes'] / GIB:.2f} GiB ({parts})"


def plan_everywhere(architect, infos: dict[str, dict], *, train, preset: str, model_ref: str, dataset: dict,
                    run_id: str, on: str | None = None) -> tuple[dict, dict]:
    """({executor: plan} where it fits, {executor: plan} where it does not); PlacementError (exit 2)
    with every executor's breakdown when it fits none. The model is prepared on each executor (a host
    converts or builds it once, then caches it)."""
    targets = [resolve_on(on, infos)] if on else list(infos)
    fit, refused = {}, {}
    for n in targets:
        h, hw = infos[n]["handle"], infos[n]["hardware"]
        model_cfg = call(h, "prepare_model", model_ref)
        plan = call(architect, "design_plan", train, hw, model_cfg, model_ref, dataset, None, run_id, False, preset)
        (fit if plan["estimate"]["fits"] else refused)[n] = plan
    if not fit:
        lines = "; ".join(f"{infos[n]['node']} ({infos[n]['hardware'].get('hostname')}): {breakdown(p)}"
                          for n, p in refused.items())
        where = f"executor {infos[targets[0]]['node']} (--on)" if on else f"any of the {len(targets)} executor(s)"
        raise PlacementError(f"the plan does not fit {where}: {lines}", 2)
    return fit, refused


def enqueue(scheduler, architect, run_id: str, plans: dict, *, dataset: dict, pinned: str | None = None,
            group: str | None = None, max_parallel: int | None = None, title: str | None = None,
            session_id: str | None = None, workspace: str | None = None) -> dict:
    """Queue a planned run. The architect reads the dataset version's files (they live in its
    workspace); they travel once, with the entry."""
    spec = call(architect, "submission", next(iter(plans.values())), dataset)
    return call(scheduler, "add", run_id, {"plans": plans, "model_ref": spec["model_ref"], "dataset": spec["dataset"],
                                                 "pinned": pinned, "group": group, "max_parallel": max_parallel,
                                                 "title": title, "session_id": session_id,
                                                 "workspace": workspace})


def wait_placed(scheduler, run_id: str, timeout: float | None = None, poll: float = 0.3) -> dict:
    """The entry once it left the queue (running, or ended before it started), or, after ``timeout``
    seconds, as it is (still queued)."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        e = call(scheduler, "get", run_id, timeout=60)
        if e["state"] != "queued" or (deadline is not None and time.time() >= deadline):
            return e
        time.sleep(poll)
