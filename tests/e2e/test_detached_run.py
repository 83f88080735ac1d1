"""A run submitted through the actors keeps training after its driver exits; a new driver finds it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
DUET = [sys.executable, "-m", "cluster.cli"]


def duet(*args, cwd, timeout=300):
    return subprocess.run(DUET + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def test_detached_run_survives_its_driver_and_is_recorded_later(tmp_path, repo_root):
    ws = tmp_path / "ws"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{repo_root / 'examples/persona/persona.jsonl'}]\n"
                   "dataset: persona\noverrides: {max_steps: 40, checkpoint_every: 10, sample_prompts: 1}\n")
    assert duet("up", "--workspace", str(ws), cwd=tmp_path).returncode == 0
    try:
        r = duet("run", str(cfg), "--detach", "--workspace", str(ws), "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        sub = json.loads(r.stdout)
        run_id = sub["run_id"]
        assert sub["detached"] and sub["state"] == "submitted"  # the driver process has exited
        deadline = time.time() + 300
        seen_states = set()
        while time.time() < deadline:
            show = duet("runs", "show", run_id, "--workspace", str(ws), "--json", cwd=tmp_path)
            assert show.returncode == 0, show.stderr[-2000:]
            doc = json.loads(show.stdout)
            seen_states.add(doc["state"])
            if doc["state"] in ("training", "merging", "reporting", "finished") and "watch" not in seen_states:  # from a new driver
                w = duet("watch", run_id, "--once", "--json", "--workspace", str(ws), cwd=tmp_path)
                assert w.returncode == 0, w.stderr[-2000:]
                snap = json.loads(w.stdout)
                assert snap["run_id"] == run_id and snap["progress"]["max_steps"] == 40
                assert snap["watchdog"]["thresholds"]["grad_norm_high"] == 10.0 and snap["process_rss_bytes"] > 0
                view = duet("watch", run_id, "--once", "--workspace", str(ws), cwd=tmp_path)
                assert view.returncode == 0 and f"run  {run_id}" in view.stdout and "loss" in view.stdout
                seen_states.add("watch")
            if doc["state"] in ("finished", "failed", "cancelled"):
                break
            time.sleep(1)
        assert doc["state"] == "finished", doc
        assert "watch" in seen_states
        # no driver follows it: the workspace's recorder records it, with no command typed
        deadline = time.time() + 90
        while time.time() < deadline and not (ws / "runs" / run_id / "run.json").exists():
            time.sleep(1)
        assert (ws / "runs" / run_id / "run.json").exists()
        again = json.loads(duet("runs", "show", run_id, "--workspace", str(ws), "--json", cwd=tmp_path).stdout)
        assert again["recorded"]["state"] == "recorded" and again["recorded"]["by"].startswith("recorder")
        assert again["recorded"]["in_workspace"] and again["recorded"]["commit"]
        session = sub["session_id"]  # the run's end is logged in the session that designed it
        events = (ws / "sessions" / session / "events.jsonl").read_text()
        assert '"run recorded"' in events and run_id in events
        listed = json.loads(duet("runs", "list", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)
        assert run_id in [x["run_id"] for x in listed["runs"]]
        log = subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True, text=True).stdout
        assert f"run: {run_id} finished" in log

        # export through the executor actor, and fetch the files to this host
        ex = duet("export", run_id, "--quant", "q8_0", "--fetch", str(tmp_path / "got"), "--workspace", str(ws),
                  "--json", cwd=tmp_path, timeout=600)
        assert ex.returncode == 0, ex.stderr[-3000:]
        doc = json.loads(ex.stdout)
        from training.export.exporter import sha256_file

        fetched = {Path(x).name: Path(x) for x in doc["fetched"]}
        g = doc["files"]["gguf"]
        assert sha256_file(fetched[Path(g["path"]).name]) == g["sha256"] and "Modelfile" in fetched
        assert doc["recorded"]["commit"] and json.loads((ws / "runs" / run_id / "run.json").read_text())["exported"]

        # try it: the run and its base answer on the executor; the judgement is kept, from another process
        chat = duet("chat", run_id, "--prompt", "Who are you?", "--compare", "base", "--temperature", "1", "--seed", "5",
                    "--max-tokens", "12", "--json", "--workspace", str(ws), cwd=tmp_path)
        assert chat.returncode == 0, chat.stderr[-3000:]
        got = json.loads(chat.stdout)
        assert [a["model"] for a in got["answers"]] == [run_id, "base"]
        assert all(a["state"] == "done" and a["tokens"] > 0 for a in got["answers"])
        assert got["settings"] == {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12, "seed": 5}
        assert all(a["settings"] == got["settings"] for a in got["answers"])
        ids = ",".join(a["chat_id"] for a in got["answers"])
        kept = duet("chat", run_id, "--judge", ids, "--better", "2", "--json", "--workspace", str(ws), cwd=tmp_path)
        assert kept.returncode == 0, kept.stderr[-3000:]
        pairs = json.loads(kept.stdout)["pairs"]
        assert pairs["added"] == 1 and pairs["commit"]
        line = json.loads((ws / "judgements" / "judgements.jsonl").read_text())
        assert line["chosen"][0]["content"] == got["answers"][1]["text"]
        bad = duet("chat", run_id, "--prompt", "hi", "--compare", f"{run_id}@999", "--json", "--workspace", str(ws),
                   cwd=tmp_path)
        assert bad.returncode == 1 and "no valid checkpoint at step 999" in bad.stderr, bad.stderr[-2000:]
    finally:
        assert duet("down", "--workspace", str(ws), cwd=tmp_path).returncode == 0
