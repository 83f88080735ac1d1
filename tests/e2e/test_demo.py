"""``duet demo --tiny`` as a user runs it: real Ray (token auth), real Postgres and Mongo-wire."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
DUET = [sys.executable, "-m", "cluster.cli"]


def duet(*args, cwd, timeout=600):
    return subprocess.run(DUET + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def _alive(pid: int) -> bool:
    from infra.services import pid_alive

    return pid_alive(pid)


def test_demo_on_services_from_duet_up(tmp_path):
    ws = tmp_path / "ws"
    up = duet("up", "--workspace", str(ws), "--json", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    state = json.loads((ws / ".duet" / "services.json").read_text())
    pids = {k: v["pid"] for k, v in state.items()}
    assert set(pids) == {"head", "postgres", "mongo"}
    try:
        r = duet("demo", "--tiny", "--workspace", str(ws), "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads(r.stdout)
        assert s["services_started"] == []  # reused what `duet up` started
        assert s["eval_loss_after"] < s["eval_loss_before"]

        # git: dataset, then config, then run, in that order
        subjects = subprocess.run(["git", "log", "--reverse", "--format=%s"], cwd=ws, capture_output=True,
                                  text=True, check=True).stdout.splitlines()
        kinds = [x.split(":")[0] for x in subjects]
        assert kinds.index("dataset") < kinds.index("config") < kinds.index("run")
        assert f"run/{s['run_id']}" in subprocess.run(["git", "tag"], cwd=ws, capture_output=True, text=True).stdout

        # run.json names the dataset version that is in the workspace
        rec = json.loads((ws / "runs" / s["run_id"] / "run.json").read_text())
        manifest = json.loads((Path(s["dataset"]["path"]) / "manifest.json").read_text())
        assert rec["dataset"]["content_hash"] == manifest["content_hash"]
        for field in ("config", "code_sha", "host", "checkpoints", "eval_loss_before", "eval_loss_after",
                      "merged_model", "adapter_path", "samples"):
            assert rec.get(field) not in (None, [], {}), field
        assert rec["eval_loss_after"] < rec["eval_loss_before"]

        # the demo ends with a verified GGUF and a Modelfile, recorded in the workspace
        e = s["exported"]
        assert Path(e["gguf"]).stat().st_size == e["bytes"] and Path(e["modelfile"]).read_text().startswith("FROM ./")
        assert e["verification"]["top1_agreement"] >= 0.9 and "ollama create persona" in e["run_it"]
        assert e["verification"]["judge"].startswith("llama.cpp")  # llama.cpp itself loaded and checked it
        assert rec["exported"][-1]["files"]["gguf"]["sha256"] == e["sha256"]
        assert "export" in kinds and "persona.gguf" in (ws / "runs" / s["run_id"] / "report.md").read_text()

        # the session log holds every step, mirrored to both stores
        events = [json.loads(x) for x in
                  (ws / "sessions" / s["session_id"] / "events.jsonl").read_text().splitlines()]
        steps = [e["payload"].get("step") for e in events]
        for step in ("dataset", "plan", "submitted", "run recorded", "hypothesis", "exported"):
            assert step in steps, step
        run_events = {e["payload"]["event"] for e in events if e["kind"] == "run-event"}
        assert {"preflight", "checkpoint", "eval", "merged"} <= run_events

        import psycopg
        import pymongo

        with psycopg.connect(state["postgres"]["url"]) as c:
            n_pg = c.execute("SELECT count(*) FROM events WHERE session_id = %s", (s["session_id"],)).fetchone()[0]
            run_row = c.execute("SELECT status, dataset_hash FROM runs WHERE id = %s", (s["run_id"],)).fetchone()
            facts = c.execute("SELECT kind FROM facts").fetchall()
        assert n_pg == len(events)
        assert run_row == ("finished", manifest["content_hash"])
        assert {"measurement", "promoted-hypothesis", "export"} <= {f[0] for f in facts}
        mc = pymongo.MongoClient(state["mongo"]["url"], serverSelectionTimeoutMS=5000)
        assert mc.duet.events.count_documents({"session_id": s["session_id"]}) == len(events)
        assert mc.duet.hypotheses.find_one({"id": s["hypothesis"]["id"]})["status"] == "promoted"
        mc.close()

        # the executor served Prometheus metrics while training
        m = s["metrics_during_training"]
        assert m["duet_train_step"] >= 1 and m["duet_train_loss"] > 0 and m["duet_train_tokens_per_second"] > 0
        assert "duet_train_learning_rate" in m and "duet_train_grad_norm" in m
    finally:
        down = duet("down", "--workspace", str(ws), "--json", cwd=tmp_path)
    assert down.returncode == 0
    assert sorted(json.loads(down.stdout)["stopped"]) == ["head", "mongo", "postgres"]
    assert not any(_alive(p) for p in pids.values())


def test_demo_alone_starts_and_stops_its_services(tmp_path):
    ws = tmp_path / "ws2"
    r = duet("demo", "--tiny", "--workspace", str(ws), "--json", "--max-steps", "6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert sorted(s["services_started"]) == ["head", "mongo", "postgres"]
    assert json.loads((ws / ".duet" / "services.json").read_text()) == {}
    import psutil

    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if any(str(ws) in a for a in (p.info["cmdline"] or []))]
    assert leftovers == []
    # the same demo a second time in the same workspace works and adds a second run
    r2 = duet("demo", "--tiny", "--workspace", str(ws), "--json", "--max-steps", "6", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(r2.stdout)["run_id"] != s["run_id"]


def test_bad_dataset_exits_1_naming_file_and_line_and_writes_nothing(tmp_path, repo_root):
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace('"role": "user"', '"role": "usr"')
    lines[9] = lines[9][:40]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    ws = tmp_path / "ws3"
    r = duet("demo", "--tiny", "--workspace", str(ws), "--data", str(bad), cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert f"{bad}:5" in r.stderr and "messages[1].role" in r.stderr
    assert f"{bad}:10" in r.stderr and "invalid JSON" in r.stderr
    assert not (ws / "datasets").exists()  # nothing started, nothing half-written


def test_missing_model_path_exits_1(tmp_path):
    r = duet("demo", "--model", str(tmp_path / "no-such-model"), "--workspace", str(tmp_path / "w"), cwd=tmp_path,
             timeout=120)
    assert r.returncode == 1
    assert "no-such-model: no such model folder" in r.stderr
