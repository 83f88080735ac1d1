"""Embedded mode: one machine, one Ray node with both role resources, stores under the workspace.

``up`` reuses whatever is already running for the workspace (recorded in .duet/services.json) and
starts the rest; ``down`` stops exactly what duet started for it, by PID. ``DUET_POSTGRES_URL`` /
``DUET_MONGO_URL`` point at external servers instead of embedded ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cluster import ray_node
from infra import services

EMBEDDED_RESOURCES = {"architect": 1, "executor": 1}


@dataclass
class Embedded:
    workspace: Path
    ray_address: str
    postgres_url: str | None
    mongo_url: str | None
    started: list[str]

    def to_dict(self) -> dict:
        return {"workspace": str(self.workspace), "ray_address": self.ray_address,
                "postgres_url": self.postgres_url, "mongo_url": self.mongo_url, "started": self.started}


def state_dir(workspace: str | os.PathLike) -> Path:
    return Path(workspace).resolve() / ".duet"


def running(workspace: str | os.PathLike) -> dict:
    """What is recorded as running for this workspace, with liveness."""
    st = services.StateFile(state_dir(workspace)).read()
    return {k: {**v, "alive": services.pid_alive(v["pid"])} for k, v in st.items()}


def store_urls(workspace: str | os.PathLike) -> tuple[str | None, str | None]:
    """The stores this workspace uses, resolved in one place: DUET_POSTGRES_URL / DUET_MONGO_URL,
    else the ones `duet up` started for it and that still run (None where neither)."""
    st = running(workspace)
    pg = st.get("postgres", {}).get("url") if st.get("postgres", {}).get("alive") else None
    mongo = st.get("mongo", {}).get("url") if st.get("mongo", {}).get("alive") else None
    return os.environ.get("DUET_POSTGRES_URL") or pg, os.environ.get("DUET_MONGO_URL") or mongo


def check_queue(workspace: str | os.PathLike) -> None:
    """The workspace's queue file (``.duet/queue.json``) checked whole; ValueError naming it and the
    problem, before anything starts or is written (not a dead scheduler later)."""
    from roles.queue import QueueError, load_entries

    queue = Path(workspace) / ".duet" / "queue.json"
    if queue.exists() or queue.is_symlink():
        try:
            load_entries(queue)
        except QueueError as exc:
            raise ValueError(str(exc)) from None


def up(workspace: str | os.PathLike, *, ray_port: int | None = None) -> Embedded:
    check_queue(workspace)
    sd = state_dir(workspace)
    sd.mkdir(parents=True, exist_ok=True)
    before = running(workspace)
    started = []
    pg_url = os.environ.get("DUET_POSTGRES_URL")
    if not pg_url:
        pg_url = services.start_postgres(sd).url
    mongo_url = os.environ.get("DUET_MONGO_URL")
    if not mongo_url:
        mongo_url = services.start_mongo(sd).url
    port = ray_port or services.free_port(range(ray_node.DEFAULT_HEAD_PORT, ray_node.DEFAULT_HEAD_PORT + 50))
    head = ray_node.start_head(sd, resources=EMBEDDED_RESOURCES, ip="127.0.0.1", port=port)
    after = running(workspace)
    for key in after:
        if key not in before or not before[key]["alive"] or before[key]["pid"] != after[key]["pid"]:
            started.append(key)
    return Embedded(Path(workspace).resolve(), head.address, pg_url, mongo_url, started)


def down(workspace: str | os.PathLike, only: list[str] | None = None) -> list[str]:
    """Stop the dashboard and the Ray node first (its actors hold store connections), then the stores."""
    sd = state_dir(workspace)
    stopped = []
    if (only is None or "dashboard" in only) and services.stop_recorded(sd, "dashboard"):
        stopped.append("dashboard")
    if (only is None or "head" in only) and ray_node.stop_node(sd, "head"):
        stopped.append("head")
    if (only is None or "postgres" in only) and services.stop_postgres(sd):
        stopped.append("postgres")
    if (only is None or "mongo" in only) and services.stop_mongo(sd):
        stopped.append("mongo")
    return stopped
