"""Runs as people see them without a cluster (roles/run_view.py), and the live chart's cursor
(training.run.executor.points_after)."""

import json

from roles import run_view
from training.run.executor import points_after


def _record(ws, run_id, **kw):
    d = ws / "runs" / run_id
    d.mkdir(parents=True)
    rec = {"run_id": run_id, "status": "finished", "steps": 3, "started": 100.0, "phase": "sft", "name": "demo",
           "config": {"train": {"max_steps": 3}}, "losses": [{"step": s, "loss": 2.0 / s, "time": s} for s in (1, 2, 3)],
           "eval_losses": [{"step": 0, "eval_loss": 2.5}, {"step": 3, "eval_loss": 1.0}], "eval_loss_after": 1.0,
           "placement": {"node": "gpu-b", "queued_at": 99.0}, **kw}
    (d / "run.json").write_text(json.dumps(rec))
    (d / "events.jsonl").write_text(json.dumps({"seq": 0, "event": "state", "state": "finished"}) + "\n")
    return rec


def test_recorded_runs_and_the_table_without_a_cluster(tmp_path):
    ws = tmp_path / "ws"
    _record(ws, "old-run")
    _record(ws, "new-run", started=200.0, status="failed", error="boom")
    (ws / "runs" / "broken").mkdir()
    (ws / "runs" / "broken" / "run.json").write_text("{not json")
    (ws / "runs" / "liar").mkdir()
    (ws / "runs" / "liar" / "run.json").write_text(json.dumps({"run_id": "someone-else"}))
    secret = tmp_path / "ray_token"
    secret.write_text(json.dumps({"run_id": "leak", "token": "TOPSECRET"}))
    (ws / "runs" / "leak").mkdir()
    (ws / "runs" / "leak" / "run.json").symlink_to(secret)  # git carries symlinks in on a pull
    rows = run_view.recorded_runs(ws)
    assert set(rows) == {"old-run", "new-run", "broken", "liar", "leak"}
    assert rows["old-run"]["node"] == "gpu-b" and rows["old-run"]["eval_loss"] == 1.0
    for bad, says in (("broken", "not valid JSON"), ("liar", "someone-else"), ("leak", "outside")):
        assert rows[bad]["state"] == "damaged" and says in rows[bad]["error"], rows[bad]
    assert "TOPSECRET" not in json.dumps(rows) and "TOPSECRET" not in json.dumps(run_view.recorded_run(ws, "leak"))
    doc = run_view.overview(ws, connected=False)
    assert [r["run_id"] for r in doc["runs"]][:2] == ["new-run", "old-run"] and doc["connected"] is False
    assert run_view.recorded_run(ws, "../old-run") is None and run_view.recorded_run(ws, "nope") is None
    got = run_view.recorded_run(ws, "old-run")
    s = run_view.series_from_record(got["record"], got["events"])
    assert [p["step"] for p in s["points"]] == [1, 2, 3] and s["reset"] and s["state"] == "finished"
    assert s["next_seq"] == 1 and s["eval"][-1]["eval_loss"] == 1.0


def test_sweep_runs(tmp_path):
    ws = tmp_path / "ws"
    rows = [{"run_id": "a", "group": "sw1"}, {"run_id": "b", "group": "sw1"}, {"run_id": "c", "group": None}]
    assert run_view.sweep_runs(ws, rows, "sw1") == ["a", "b"]
    (ws / "sweeps" / "sw2").mkdir(parents=True)
    (ws / "sweeps" / "sw2" / "comparison.json").write_text(json.dumps({"rows": [{"run_id": "x"}, {"run_id": "y"}]}))
    assert run_view.sweep_runs(ws, rows, "sw2") == ["x", "y"]
    assert run_view.sweep_runs(ws, rows, "../sw2") == [] and run_view.sweep_runs(ws, rows, "none") == []
    (ws / "comparison.json").write_text(json.dumps({"rows": [{"run_id": "outside"}]}))
    assert run_view.sweep_runs(ws, rows, "..") == [] and run_view.sweep_runs(ws, rows, ".") == []


def test_the_cursor_sends_what_is_new_and_everything_after_a_rollback():
    losses = [{"step": s, "time": 10.0 + s} for s in range(1, 11)]
    assert points_after(losses, 0, None) == (True, 0)                 # a new viewer: everything
    assert points_after(losses, 7, 17.0) == (False, 7)                # steps 8..10
    assert points_after(losses, 10, 20.0) == (False, 10)              # nothing new
    assert points_after(losses, 7, 99.0) == (True, 0)                 # step 7 was logged again: reset
    rolled = losses[:5]                                               # rolled back to step 5
    assert points_after(rolled, 7, 17.0) == (True, 0)
    assert points_after([], 3, 13.0) == (True, 0)
