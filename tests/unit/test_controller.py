"""The head's run controller and the architect's recorder without Ray: executors of our own behind the
``Executors`` protocol, the real queue file, a real workspace (git, session) for the recorder."""

import json
import subprocess

import pytest

from infra.run_states import TERMINAL, RunState
from roles.controller import RunController, RunUnknown
from roles.queue import RunQueue
from roles.recorder import Recorder, record_into

GIB = 2**30


class FakeExecutors:
    """Executors by name: each has free memory, the runs it holds and their states; ``down`` ones do
    not answer."""

    def __init__(self, free: dict[str, int]):
        self.free = dict(free)
        self.runs: dict[str, dict[str, str]] = {n: {} for n in free}
        self.down: set[str] = set()
        self.submitted: list[tuple[str, dict]] = []

    def answering(self) -> list[str]:
        return [n for n in self.free if n not in self.down]

    def status(self, name, run_id):
        if name in self.down:
            raise ConnectionError(name)
        if run_id not in self.runs[name]:
            raise RunUnknown(f"no run {run_id}")
        return {"state": self.runs[name][run_id], "error": None}

    def idle(self, names_):
        return {n: {"device": "cpu", "ram_available_bytes": self.free[n]} for n in names_
                if not any(s not in TERMINAL for s in self.runs[n].values())}

    def where(self, name):
        return {"ip": f"10.0.0.{len(name)}", "host": name, "node_id": name}

    def submit(self, name, spec):
        self.runs[name][spec["run_id"]] = "training"
        self.submitted.append((name, spec))

    def cancel(self, name, run_id):
        self.runs[name][run_id] = "cancelled"
        return {"run_id": run_id}


def plan(gib: float) -> dict:
    return {"estimate": {"total_bytes": int(gib * GIB)}, "train": {"max_steps": 5}}


def queue(c: RunController, run_id: str, fits: dict, workspace="/ws", session="s1") -> dict:
    return c.add(run_id, plans={n: plan(g) for n, g in fits.items()}, model_ref="tiny",
                 dataset={"name": "d", "content_hash": "h", "files": {}}, session_id=session, workspace=workspace)


def test_runs_are_placed_followed_and_left_to_record_by_the_controller(tmp_path):
    ex = FakeExecutors({"duet-executor": 8 * GIB, "duet-executor:gpu-b": 16 * GIB})
    c = RunController(str(tmp_path / "queue.json"), ex, start=False)
    queue(c, "r1", {"duet-executor": 4, "duet-executor:gpu-b": 4})
    queue(c, "r2", {"duet-executor": 4})
    queue(c, "r3", {"duet-executor:gpu-b": 12})
    c.tick()
    # r1 goes where the most memory is free; r2 to the other; r3 waits for gpu-b
    assert [(n, s["run_id"]) for n, s in ex.submitted] == [("duet-executor:gpu-b", "r1"), ("duet-executor", "r2")]
    assert ex.submitted[0][1]["placement"]["executor"] == "duet-executor:gpu-b"
    assert c.q.get("r3")["state"] == "queued"
    assert c.q.get("r1")["record"]["state"] == "waiting" and c.q.to_record() == []
    ex.runs["duet-executor:gpu-b"]["r1"] = RunState.FINISHED.value
    c.tick()
    assert c.q.get("r1")["state"] == "finished" and c.q.get("r3")["state"] == "running"
    assert [e["run_id"] for e in c.q.to_record()] == ["r1"]
    # the queue is durable: a restarted head has the same runs to record
    assert [e["run_id"] for e in RunQueue(tmp_path / "queue.json").to_record()] == ["r1"]


def test_an_unreachable_executor_keeps_its_run_and_one_that_forgot_it_fails_it(tmp_path):
    ex = FakeExecutors({"duet-executor": 8 * GIB})
    c = RunController(str(tmp_path / "queue.json"), ex, start=False)
    queue(c, "r1", {"duet-executor": 1})
    c.tick()
    ex.down.add("duet-executor")
    c.tick()
    e = c.q.get("r1")
    assert e["state"] == "running" and e["unreachable_since"] is not None
    ex.down.clear()
    ex.runs["duet-executor"].clear()  # it came back without the run (its data dir was wiped)
    c.tick()
    e = c.q.get("r1")
    assert e["state"] == "failed" and e["record"]["state"] == "none"  # nothing on an executor to record


def test_a_record_is_claimed_once_and_a_lapsed_claim_is_taken_over(tmp_path, monkeypatch):
    ex = FakeExecutors({"duet-executor": 8 * GIB})
    c = RunController(str(tmp_path / "queue.json"), ex, start=False)
    queue(c, "r1", {"duet-executor": 1})
    assert c.q.claim("r1", "driver A", 60)  # a driver that follows the run holds it
    c.tick()
    ex.runs["duet-executor"]["r1"] = "finished"
    c.tick()
    assert c.q.to_record() == [] and c.q.claim("r1", "recorder B", 60) is None
    import roles.queue as q

    now = q.time.time()
    monkeypatch.setattr(q.time, "time", lambda: now + 61)  # the driver died: its lease lapsed
    assert [e["run_id"] for e in c.q.to_record()] == ["r1"] and c.q.claim("r1", "recorder B", 60)
    with pytest.raises(q.QueueError):
        c.q.recorded("r1", "driver A", {"path": "x"})
    c.q.recorded("r1", "recorder B", {"path": "/ws/runs/r1", "commit": "abc", "workspace": "/ws"})
    assert c.q.get("r1")["record"]["state"] == "recorded" and c.q.claim("r1", "driver A", 60) is None


def test_cancel_while_queued_leaves_nothing_to_record(tmp_path):
    c = RunController(str(tmp_path / "queue.json"), FakeExecutors({"duet-executor": GIB}), start=False)
    queue(c, "r1", {"duet-executor": 4})  # fits nowhere free now
    assert c.cancel("r1")["state"] == "cancelled"
    assert c.q.get("r1")["record"]["state"] == "none" and c.q.to_record() == []


def _files(run_id: str, status: str = "finished") -> dict:
    rec = {"run_id": run_id, "status": status, "name": "demo", "dataset": {"name": "d", "content_hash": "h" * 64},
           "eval_loss_before": 2.0, "eval_loss_after": 1.5, "host": {"hostname": "gpu"},
           "config": {"train": {"method": "lora", "micro_batch": 1, "seq_len": 64}, "estimate": {"total_bytes": 1}}}
    return {"_record": rec, "run.json": json.dumps(rec), "report.md": f"# {run_id}\n"}


def test_the_recorder_records_each_ended_run_of_its_workspace_once(tmp_path):
    from roles.architect import Architect

    ws = tmp_path / "ws"
    arch = Architect(str(ws), None, None, session_title="design")
    sid = arch.session_id  # the session that designed the runs
    arch.commit_session()
    ex = FakeExecutors({"duet-executor": 8 * GIB, "duet-executor:b": 8 * GIB})
    c = RunController(str(tmp_path / "queue.json"), ex, start=False)
    queue(c, "r1", {"duet-executor": 1}, workspace=str(ws.resolve()), session=sid)
    queue(c, "other", {"duet-executor:b": 1}, workspace="/another/laptop")
    c.tick()
    fetched = []

    def fetch(executor, run_id):
        fetched.append(run_id)
        if len(fetched) == 1:
            raise ConnectionError("the executor's node is restarting")
        return _files(run_id)

    rec = Recorder(str(ws), None, None, c.q, fetch)
    assert rec.sweep() == []  # nothing ended yet
    ex.runs["duet-executor"]["r1"] = "finished"
    ex.runs["duet-executor:b"]["other"] = "finished"
    c.tick()
    assert rec.sweep() == [] and "restarting" in rec.last_error  # the claim is given back for the next sweep
    assert c.q.get("r1")["record"]["attempts"] == 1
    got = rec.sweep()
    assert [g["run_id"] for g in got] == ["r1"] and got[0]["session_id"] == sid
    assert (ws / "runs" / "r1" / "run.json").exists() and not (ws / "runs" / "other").exists()
    assert c.q.get("r1")["record"]["state"] == "recorded" and c.q.get("other")["record"]["state"] == "pending"
    log = subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True, text=True).stdout
    assert log.count("run: r1 finished") == 1
    events = (ws / "sessions" / sid / "events.jsonl").read_text()
    assert '"run recorded"' in events  # in the session that designed it
    assert rec.sweep() == [] and fetched == ["r1", "r1"]  # once


def test_record_into_a_workspace_that_has_the_run_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    first = record_into(str(ws), None, None, _files("r9"))
    again = record_into(str(ws), None, None, _files("r9"))
    assert first["already"] is False and first["commit"] and again == {"already": True, "path": str(ws / "runs" / "r9"),
                                                                        "workspace": str(ws)}


def test_a_second_executor_on_one_machine_is_refused_naming_the_port_or_the_data_dir(tmp_path):
    """Before any node starts: a metrics port another process listens on, or a data dir a live executor
    holds, is refused with the flag that fixes it (not "Address already in use (a bug in duet)")."""
    import socket

    from cluster.two_host import check_executor_free
    from training.run import run_files

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port {port} .*--metrics-port"):
            check_executor_free(port, str(tmp_path / "a"))
    held = tmp_path / "b"
    held.mkdir()
    lock = run_files.hold_dir(held)
    try:
        with pytest.raises(ValueError, match=r"used by a live executor \(pid \d+ on .*--data-dir"):
            check_executor_free(None, str(held))
    finally:
        lock.close()
    check_executor_free(None, str(held))  # free again once its holder is gone
