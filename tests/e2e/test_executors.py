"""Three Ray nodes as three hosts on this machine: the head with an executor (127.0.0.2), a second
executor "gpu-b" (127.0.0.3) and the architect (127.0.0.4), all started with `duet node`. A sweep of
four tiny runs with --max-parallel 2 spreads over both executors; gpu-b's node is killed mid-run and
joins again, and its run resumes there with the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e
DUET = [sys.executable, "-m", "cluster.cli"]
REPO = Path(__file__).resolve().parents[2]
PORT = 6431
ADDRESS = f"127.0.0.2:{PORT}"
BASE = {"max_steps": 160, "checkpoint_every": 20, "eval_every": 160, "sample_prompts": 1, "max_new_tokens": 8,
        "micro_batch": 2}


def duet(*args, timeout=300, env=None):
    return subprocess.run(DUET + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(r.stdout)


def config(path: Path, overrides: dict) -> Path:
    path.write_text(f"preset: demo\nmodel: tiny\ndata: [{REPO / 'examples/persona/persona.jsonl'}]\ndataset: persona\n"
                    f"overrides: {json.dumps(overrides)}\n")
    return path


def join_b(tmp: Path, env=None) -> dict:
    return ok(duet("node", "join", "--role", "executor", "--name", "gpu-b", "--address", ADDRESS, "--bind", "127.0.0.3",
                   "--data-dir", tmp / "exec-b", "--metrics-port", PORT + 2001, "--timeout", 60, "--json", env=env))


@pytest.fixture
def three(tmp_path):
    ok(duet("node", "start", "--role", "executor", "--head", "--bind", "127.0.0.2", "--port", PORT,
            "--data-dir", tmp_path / "exec-head", "--metrics-port", PORT + 2000, "--json"))
    yield tmp_path
    duet("node", "stop", "--all")
    from cluster import two_host

    assert not any(v["alive"] for v in two_host.local_nodes().values())


def steps_logged(run_dir: Path) -> list[int]:
    f = run_dir / "losses.jsonl"
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def wait_for(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_node(key: str) -> None:
    from cluster import two_host

    pid = two_host.local_nodes()[key]["pid"]
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def test_a_sweep_spreads_over_two_executors_and_a_lost_node_resumes_its_run(three):
    tmp = three
    b = join_b(tmp)
    assert b["executor"] == "duet-executor:gpu-b" and b["actor"]["ip"] == "127.0.0.3"
    ok(duet("node", "join", "--role", "architect", "--address", ADDRESS, "--bind", "127.0.0.4", "--workspace",
            tmp / "ws", "--json"))
    st = ok(duet("status", "--address", ADDRESS, "--workspace", tmp / "ws", "--json"))["cluster"]
    assert {e["node"]: e["ip"] for e in st["executors"]} == {"head": "127.0.0.2", "gpu-b": "127.0.0.3"}

    cfg = config(tmp / "sweep.yaml", BASE)
    sweep = subprocess.Popen(DUET + ["sweep", str(cfg), "--grid", "learning_rate=1e-4,3e-4", "--grid", "lora.r=4,8",
                                     "--max-parallel", "2", "--address", ADDRESS, "--workspace", str(tmp / "ws"), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        # gpu-b trains a run; kill its node (every process of it, by PID) after a checkpoint or two
        victim = wait_for(lambda: next((d for d in (tmp / "exec-b" / "runs").glob("*") if len(steps_logged(d)) >= 45),
                                       None) if (tmp / "exec-b" / "runs").exists() else None, 600, "a run on gpu-b")
        kill_node("executor-127.0.0.3")
        died_at = max(steps_logged(victim))
        # the head's runs go on meanwhile
        head_runs = tmp / "exec-head" / "runs"
        before = {d.name: len(steps_logged(d)) for d in head_runs.glob("*")}
        wait_for(lambda: any(len(steps_logged(d)) > before.get(d.name, 0) + 10 for d in head_runs.glob("*")), 120,
                 "the head's run to go on")

        def b_dead():
            nodes = ok(duet("status", "--address", ADDRESS, "--workspace", tmp / "ws", "--json"))["cluster"]["nodes"]
            return not any(n["address"] == "127.0.0.3" and n["alive"] for n in nodes)
        wait_for(b_dead, 120, "Ray to see gpu-b's node dead")
        listed = ok(duet("runs", "list", "--address", ADDRESS, "--workspace", tmp / "ws", "--json"))
        row = next(r for r in listed["runs"] if r["run_id"] == victim.name)
        assert row["state"] == "running" and row["node"] == "gpu-b"  # still its own: its checkpoints are there
        join_b(tmp)  # gpu-b is back: its executor restarts there and resumes the run
        out, err = sweep.communicate(timeout=1200)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err[-4000:]
    c = json.loads(out)
    assert len(c["rows"]) == 4 and all(r["status"] == "finished" for r in c["rows"]), c["rows"]
    ws = tmp / "ws"
    assert (ws / "sweeps" / c["sweep_id"] / "comparison.md").is_file()
    events = [json.loads(x) for s in (ws / "sessions").glob("*/events.jsonl") for x in s.read_text().splitlines()]
    assert any(e["payload"].get("step") == "sweep" and e["payload"].get("sweep_id") == c["sweep_id"] for e in events)

    recs = {r["run_id"]: json.loads((ws / "runs" / r["run_id"] / "run.json").read_text()) for r in c["rows"]}
    where = {rid: rec["placement"]["executor"] for rid, rec in recs.items()}
    assert set(where.values()) == {"duet-executor", "duet-executor:gpu-b"} and where[victim.name].endswith("gpu-b")
    span = {rid: (min(x["time"] for x in rec["losses"]), max(x["time"] for x in rec["losses"])) for rid, rec in recs.items()}
    pairs = [(a, b) for a in span for b in span if a < b and span[a][0] < span[b][1] and span[b][0] < span[a][1]]
    assert pairs, span  # two at a time ...
    assert all(where[a] != where[b] for a, b in pairs), (pairs, where)  # ... on different executors
    for rid in span:  # ... and never three
        t = span[rid][0]
        assert sum(1 for s in span.values() if s[0] <= t <= s[1]) <= 2, span

    # the lost run resumed from its newest checkpoint on gpu-b; the others never stopped
    ev = [json.loads(x) for x in (ws / "runs" / victim.name / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in ev if e["event"] == "resume"]
    assert resumes and int(resumes[-1]["checkpoint"].split("-")[-1]) in {died_at // 20 * 20, died_at // 20 * 20 - 20}
    for rid in recs:
        if rid != victim.name:
            assert not any(json.loads(x)["event"] == "resume"
                           for x in (ws / "runs" / rid / "events.jsonl").read_text().splitlines())
    # ... with the per-step losses of an uninterrupted run of the same point (on the head)
    point = next(r["point"] for r in c["rows"] if r["run_id"] == victim.name)
    ref_cfg = config(tmp / "ref.yaml", {**BASE, "learning_rate": point["learning_rate"],
                                        "lora": {**recs[victim.name]["config"]["train"]["lora"]}})
    ref = ok(duet("run", ref_cfg, "--on", "head", "--address", ADDRESS, "--workspace", ws, "--json", timeout=900))
    assert ref["placement"]["executor"] == "duet-executor"
    got = {x["step"]: x["loss"] for x in recs[victim.name]["losses"]}
    base = {x["step"]: x["loss"] for x in json.loads((ws / "runs" / ref["run_id"] / "run.json").read_text())["losses"]}
    assert sorted(got) == sorted(base) == list(range(1, BASE["max_steps"] + 1))
    assert all(abs(got[s] - base[s]) <= 1e-6 for s in base), [(s, got[s], base[s]) for s in base if got[s] != base[s]][:5]


def test_placement_refuses_what_fits_nowhere_and_places_what_fits_one(three):
    """gpu-b lets duet plan with 1 GiB only (DUET_MEMORY_LIMIT in its node's environment): a run that
    needs ~1.5 GiB goes to the head; one that needs ~38 GiB is refused, naming both breakdowns."""
    tmp, ws = three, three / "ws"
    join_b(tmp, env={"DUET_MEMORY_LIMIT": "1GiB"})
    ok(duet("node", "join", "--role", "architect", "--address", ADDRESS, "--bind", "127.0.0.4", "--workspace", ws,
            "--json"))
    st = ok(duet("status", "--address", ADDRESS, "--workspace", ws, "--json"))["cluster"]
    assert {e["node"]: e["total_bytes"] for e in st["executors"]}["gpu-b"] == 2**30
    small = {"max_steps": 4, "checkpoint_every": 4, "eval_every": 4, "sample_prompts": 1, "max_new_tokens": 4}
    huge = duet("run", config(tmp / "huge.yaml", {**small, "seq_len": 512, "micro_batch": 4096}), "--address", ADDRESS,
                "--workspace", ws)
    assert huge.returncode == 2, huge.stderr[-2000:]
    assert "does not fit any of the 2 executor(s)" in huge.stderr and "head (" in huge.stderr and "gpu-b (" in huge.stderr
    assert huge.stderr.count("GiB of") >= 2
    one = ok(duet("run", config(tmp / "one.yaml", {**small, "seq_len": 512, "micro_batch": 64}), "--address", ADDRESS,
                  "--workspace", ws, "--json", timeout=600))
    assert one["placement"]["executor"] == "duet-executor"  # gpu-b's 1 GiB is too little for it
    r = duet("run", config(tmp / "pinned.yaml", {**small, "seq_len": 512, "micro_batch": 64}), "--on", "gpu-b",
             "--address", ADDRESS, "--workspace", ws)
    assert r.returncode == 2 and "gpu-b (" in r.stderr, r.stderr[-2000:]
    r = duet("run", config(tmp / "lost.yaml", small), "--on", "nowhere", "--address", ADDRESS, "--workspace", ws)
    assert r.returncode == 1 and "--on nowhere" in r.stderr and "gpu-b" in r.stderr, r.stderr[-2000:]

    # the head is busy: a second run pinned there waits in the queue, and cancelled there, never starts
    long = ok(duet("run", config(tmp / "long.yaml", {**BASE, "max_steps": 3000, "checkpoint_every": 1000,
                                                      "eval_every": 3000}), "--on", "head", "--detach",
                   "--address", ADDRESS, "--workspace", ws, "--json"))
    assert long["state"] == "submitted"
    waiting = ok(duet("run", config(tmp / "next.yaml", small), "--on", "head", "--detach", "--address", ADDRESS,
                      "--workspace", ws, "--json"))
    assert waiting["state"] == "queued"
    rows = {x["run_id"]: x for x in ok(duet("runs", "list", "--address", ADDRESS, "--workspace", ws, "--json"))["runs"]}
    assert rows[waiting["run_id"]]["state"] == "queued" and rows[waiting["run_id"]]["fits_on"] == ["head"]
    cancelled = ok(duet("runs", "cancel", waiting["run_id"], "--address", ADDRESS, "--workspace", ws, "--json"))
    assert cancelled["state"] == "cancelled"
    ok(duet("runs", "cancel", long["run_id"], "--address", ADDRESS, "--workspace", ws, "--json"))
    wait_for(lambda: ok(duet("runs", "show", long["run_id"], "--address", ADDRESS, "--workspace", ws,
                             "--json"))["state"] == "cancelled", 120, "the long run to stop")
    time.sleep(3)  # the scheduler had seconds to start the cancelled one, had it kept it
    assert not (tmp / "exec-head" / "runs" / waiting["run_id"]).exists()


def test_a_run_moves_to_another_executor_and_finishes_there(three):
    """`duet runs move`: the run stops on the head, its newest checkpoint travels to gpu-b (checked
    file by file), and it resumes there; every step is logged once the run is done."""
    tmp, ws = three, three / "ws"
    join_b(tmp)
    ok(duet("node", "join", "--role", "architect", "--address", ADDRESS, "--bind", "127.0.0.4", "--workspace", ws,
            "--json"))
    cfg = config(tmp / "run.yaml", {**BASE, "max_steps": 400})  # room for the commands below on a loaded machine
    run_id = ok(duet("run", cfg, "--on", "head", "--detach", "--address", ADDRESS, "--workspace", ws, "--json"))["run_id"]
    wait_for(lambda: len(steps_logged(tmp / "exec-head" / "runs" / run_id)) >= 45, 300, "step 45 on the head")
    r = duet("runs", "move", run_id, "--to", "head", "--address", ADDRESS, "--workspace", ws)
    assert r.returncode == 1 and "on head already" in r.stderr, r.stderr[-2000:]
    moved = ok(duet("runs", "move", run_id, "--to", "gpu-b", "--address", ADDRESS, "--workspace", ws, "--json"))
    assert moved["to"] == "gpu-b" and moved["checkpoint"].startswith("checkpoint-") and moved["bytes"] > 0
    listed = ok(duet("runs", "list", "--address", ADDRESS, "--workspace", ws, "--json"))["runs"]
    [row] = [x for x in listed if x["run_id"] == run_id]
    assert row["node"] == "gpu-b" and row["state"] in ("preflight", "training"), row

    def done():
        st = ok(duet("runs", "show", run_id, "--address", ADDRESS, "--workspace", ws, "--json"))
        return st if st["state"] in ("finished", "failed", "cancelled") else None
    st = wait_for(done, 600, "the moved run to end")
    assert st["state"] == "finished", st
    wait_for(lambda: (ws / "runs" / run_id / "run.json").exists(), 90, "the architect's recorder to record it")
    rec = json.loads((ws / "runs" / run_id / "run.json").read_text())
    assert sorted(x["step"] for x in rec["losses"]) == list(range(1, 401))
    assert rec["moves"][0]["checkpoint"] == moved["checkpoint"] and "moved_to" not in rec
    ev = [json.loads(x) for x in (tmp / "exec-b" / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["checkpoint"].endswith(moved["checkpoint"]) for e in ev)
    head_rec = json.loads((tmp / "exec-head" / "runs" / run_id / "run.json").read_text())
    assert head_rec["status"] == "cancelled" and head_rec["moved_to"] == "gpu-b"
