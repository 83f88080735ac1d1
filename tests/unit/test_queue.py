"""The run queue (roles/queue.py) and executor names (roles/names.py): what starts where, and what
survives a restart of the head."""

import json

import pytest

from roles import names
from roles.queue import QueueError, RunQueue

GIB = 2**30
DATASET = {"name": "persona", "content_hash": "abc", "files": {"train.jsonl": "{}\n"}}


def plan(total_gib: float) -> dict:
    return {"run_id": "x", "train": {"max_steps": 4}, "estimate": {"total_bytes": int(total_gib * GIB)}}


def hw(free_gib: float, device: str = "cpu") -> dict:
    if device == "cuda":
        return {"device": "cuda", "gpu_free_bytes": int(free_gib * GIB), "ram_available_bytes": 64 * GIB}
    return {"device": "cpu", "ram_available_bytes": int(free_gib * GIB)}


def add(q: RunQueue, run_id: str, fits: dict, **kw) -> dict:
    return q.add(run_id, plans={n: plan(g) for n, g in fits.items()}, model_ref="tiny", dataset=DATASET, **kw)


def test_the_oldest_run_goes_to_the_idle_executor_with_most_free_memory(tmp_path):
    q = RunQueue(tmp_path / "queue.json")
    add(q, "r1", {"duet-executor": 4, "duet-executor:b": 4})
    add(q, "r2", {"duet-executor": 4, "duet-executor:b": 4})
    idle = {"duet-executor": hw(10, "cuda"), "duet-executor:b": hw(20, "cuda")}
    assert q.pick(idle) == ("r1", "duet-executor:b")
    q.started("r1", "duet-executor:b", {"ip": "10.0.0.3"})
    assert q.busy() == {"duet-executor:b"}
    assert q.pick({"duet-executor": hw(10, "cuda")}) == ("r2", "duet-executor")


def test_a_run_starts_only_where_its_plan_fits_the_memory_free_now(tmp_path):
    q = RunQueue(tmp_path / "queue.json")
    add(q, "big", {"duet-executor": 12})
    assert q.pick({"duet-executor": hw(8, "cuda")}) is None  # someone else holds the card: it waits
    add(q, "small", {"duet-executor": 2, "duet-executor:b": 2})
    assert q.pick({"duet-executor": hw(8, "cuda")}) == ("small", "duet-executor")  # the big one does not block it
    assert q.pick({"duet-executor:c": hw(80, "cuda")}) is None  # not planned for that executor


def test_pinning_and_a_sweeps_parallelism(tmp_path):
    q = RunQueue(tmp_path / "queue.json")
    with pytest.raises(QueueError, match="pinned"):
        add(q, "p", {"duet-executor": 1, "duet-executor:b": 1}, pinned="duet-executor:b")
    for i in range(3):
        add(q, f"s{i}", {"duet-executor": 1, "duet-executor:b": 1, "duet-executor:c": 1}, group="sw", max_parallel=2)
    idle = {n: hw(10) for n in ("duet-executor", "duet-executor:b", "duet-executor:c")}
    first = q.pick(idle)
    q.started(first[0], first[1], None)
    idle.pop(first[1])
    second = q.pick(idle)
    q.started(second[0], second[1], None)
    idle.pop(second[1])
    assert q.pick(idle) is None  # two of the sweep run; the third waits though an executor is idle
    q.ended(first[0], "finished")
    assert q.pick(idle) == ("s2", next(iter(idle)))


def test_the_queue_survives_a_restart_and_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "queue.json"
    q = RunQueue(path)
    add(q, "r1", {"duet-executor": 1})
    add(q, "r2", {"duet-executor": 1})
    q.started("r1", "duet-executor", {"ip": "127.0.0.2"})
    again = RunQueue(path)  # the head restarted
    assert [(e["run_id"], e["state"], e["executor"]) for e in again.list()] == \
        [("r1", "running", "duet-executor"), ("r2", "queued", None)]
    assert again.spec("r2", "duet-executor")["dataset"] == DATASET
    again.ended("r1", "finished")
    kept = json.loads(path.read_text())["entries"][0]
    assert "files" not in kept["dataset"] and again.get("r1")["estimates"] == {"duet-executor": GIB}
    assert not (tmp_path / "queue.json.tmp").exists()
    path.write_text("{not json")
    with pytest.raises(QueueError, match="not a duet queue file"):
        RunQueue(path)
    path.write_text(json.dumps({"schema": 99, "entries": []}))
    with pytest.raises(QueueError, match="schema 99"):
        RunQueue(path)


def test_a_queue_path_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    q = RunQueue("~/duet/queue.json")
    add(q, "r1", {"duet-executor": 1})
    assert (tmp_path / "duet" / "queue.json").is_file()


def test_cancel_a_queued_run_and_not_a_finished_one(tmp_path):
    q = RunQueue(tmp_path / "queue.json")
    add(q, "r1", {"duet-executor": 1})
    assert q.cancel("r1")["state"] == "cancelled"
    assert q.pick({"duet-executor": hw(10)}) is None
    with pytest.raises(QueueError, match="cancelled already"):
        q.cancel("r1")
    with pytest.raises(QueueError, match="not in the queue"):
        q.cancel("nope")
    with pytest.raises(QueueError, match="queued already"):
        add(q, "r1", {"duet-executor": 1})
    with pytest.raises(QueueError, match="no executor it fits"):
        add(q, "r3", {})


def test_executor_names_are_found_by_node():
    listed = [{"name": "duet-executor:gpu-b", "namespace": "duet"}, {"name": "duet-architect", "namespace": "duet"},
              {"name": "duet-executor", "namespace": "duet"}, {"name": "duet-executor:x", "namespace": "other"},
              {"name": "duet-scheduler", "namespace": "duet"}]
    assert names.executor_names(listed) == ["duet-executor", "duet-executor:gpu-b"]
    assert names.node_of("duet-executor") == "head" and names.node_of("duet-executor:gpu-b") == "gpu-b"
    assert names.node_of("duet-architect") is None
    assert names.executor_name("gpu-b") == "duet-executor:gpu-b" and names.executor_name(None) == "duet-executor"
    for bad in ("", "head", "../x", "a b", "x" * 64):
        with pytest.raises(ValueError, match="node name"):
            names.check_node_name(bad)
