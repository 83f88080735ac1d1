"""`duet sweep` as a user runs it on one executor: two tiny runs over a learning-rate grid, the
comparison committed and tagged, `duet sweep show` reading it back; a bad grid is refused before
any run starts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
DUET = [sys.executable, "-m", "cluster.cli"]


def duet(*args, cwd, timeout=900):
    return subprocess.run(DUET + [str(x) for x in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def test_a_sweep_runs_every_point_and_names_the_best(tmp_path, repo_root):
    ws = tmp_path / "ws"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{repo_root / 'examples/persona/persona.jsonl'}]\n"
                   "dataset: persona\noverrides: {max_steps: 4, checkpoint_every: 4, eval_every: 4, sample_prompts: 1, "
                   f"report_to: [tensorboard], tracking: {{tensorboard: {{dir: '{tmp_path / 'tb'}'}}}}}}\n")
    bad = duet("sweep", cfg, "--grid", "lr=1e-4,2e-4", "-w", ws, cwd=tmp_path)
    assert bad.returncode == 1 and "not a training field" in bad.stderr and not (ws / "runs").exists()
    r = duet("sweep", cfg, "--grid", "learning_rate=1e-4,3e-4", "-w", ws, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(r.stdout)
    assert [row["point"]["learning_rate"] for row in c["rows"]] == [1e-4, 3e-4]
    assert all(row["status"] == "finished" and row["eval_loss_after"] is not None for row in c["rows"])
    assert c["best"]["eval_loss_after"] == min(row["eval_loss_after"] for row in c["rows"])
    d = ws / "sweeps" / c["sweep_id"]
    assert (d / "comparison.md").is_file() and (d / "eval_loss.svg").is_file()
    for row in c["rows"]:  # each run was recorded in the workspace as `duet run` records it
        rec = json.loads((ws / "runs" / row["run_id"] / "run.json").read_text())
        assert rec["config"]["train"]["learning_rate"] == row["point"]["learning_rate"]
        assert rec["placement"]["group"] == c["sweep_id"]
    deadline = time.time() + 120  # each point a tracker run, grouped by the sweep's id (the followers outlive the run)
    want = [tmp_path / "tb" / c["sweep_id"] / row["run_id"] for row in c["rows"]]
    while time.time() < deadline and not all(list(w.glob("events.out.tfevents.*")) for w in want):
        time.sleep(0.5)
    assert all(list(w.glob("events.out.tfevents.*")) for w in want), list((tmp_path / "tb").rglob("*"))
    tags = subprocess.run(["git", "tag"], cwd=ws, capture_output=True, text=True).stdout.split()
    assert f"sweep/{c['sweep_id']}" in tags
    shown = duet("sweep", "show", c["sweep_id"], "-w", ws, "--json", cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["best"] == c["best"]
    events = [json.loads(x) for s in (ws / "sessions").glob("*/events.jsonl") for x in s.read_text().splitlines()]
    assert any(e["payload"].get("step") == "sweep" and e["payload"].get("sweep_id") == c["sweep_id"] for e in events)
