"""How the cluster finds the roles: the Ray namespace, the actors' names and the per-host resource.
Imported by the actor shells (roles/actors.py), the scheduler and the node lifecycle (cluster/).

Executors: the head's (and the embedded cluster's) is ``duet-executor``; one that joins with
``duet node join --role executor`` is ``duet-executor:<node>``. They are found by listing the named
actors of the namespace (``executor_names``), never by one fixed name. Each executor node also offers
the resource ``duet-node-<node>``, which its actor asks for: after the node dies, Ray restarts the
actor only when a node with that resource is back, i.e. on the same host, where its checkpoints are.
"""

from __future__ import annotations

import re

NAMESPACE = "duet"
ARCHITECT_NAME = "duet-architect"
EXECUTOR_NAME = "duet-executor"
SCHEDULER_NAME = "duet-scheduler"
RECORDER_NAME = "duet-recorder"   # + ":<workspace hash>", one per design-host workspace
HEAD_NODE = "head"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_node_name(node: str) -> str:
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node) or node == HEAD_NODE:
        raise ValueError(f"node name {node!r}: use 1-63 letters, digits, '.', '_' or '-' (and not {HEAD_NODE!r})")
    return node


def executor_name(node: str | None = None) -> str:
    """``duet-executor`` for the head's executor (node None or "head"), else ``duet-executor:<node>``."""
    return EXECUTOR_NAME if node in (None, HEAD_NODE) else f"{EXECUTOR_NAME}:{check_node_name(node)}"


def node_of(actor_name: str) -> str | None:
    """The node an executor's name stands for ("head" for the head's); None for another actor."""
    if actor_name == EXECUTOR_NAME:
        return HEAD_NODE
    prefix = EXECUTOR_NAME + ":"
    return actor_name[len(prefix):] if actor_name.startswith(prefix) else None


def node_resource(node: str) -> str:
    return f"duet-node-{check_node_name(node)}"


def executor_names(named_actors: list) -> list[str]:
    """The executors among ``ray.util.list_named_actors(all_namespaces=True)`` (dicts or names), the
    head's first, then by node."""
    found = set()
    for a in named_actors:
        name, ns = (a.get("name"), a.get("namespace")) if isinstance(a, dict) else (a, NAMESPACE)
        if ns == NAMESPACE and node_of(name) is not None:
            found.add(name)
    return sorted(found, key=lambda n: (n != EXECUTOR_NAME, n))
