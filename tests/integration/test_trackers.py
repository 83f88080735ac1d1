"""A run's trackers (report_to), against the real things started here: an MLflow tracking server
(``mlflow server`` with a SQLite store, read back through its REST API), TensorBoard's event files
(read back with TensorBoard's own reader), Trackio's local store and W&B's offline run files. A kill -9
and resume continues the same MLflow run; a tracker that is down does not hold training back, and gets
everything once it is up."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra import services
from tests.mlflow_server import MLFLOW, start as _start_mlflow, stop as _stop
from tests.runs import run_plan

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS = {"max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "warmup_steps": 1, "sample_prompts": 0}


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory):
    if not MLFLOW.exists():
        pytest.fail(f"{MLFLOW} is missing: `make test` installs the MLflow server (make mlflow-server)")
    port = services.free_port(range(5400, 5500))
    p = _start_mlflow(tmp_path_factory.mktemp("mlflow"), port)
    yield f"http://127.0.0.1:{port}"
    _stop(p)


def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    return json.loads(urllib.request.urlopen(req, timeout=10).read() or b"{}")


def _runs(base: str, experiment: str, run_id: str) -> list[dict]:
    exp = _api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    got = _api(base, "runs/search", {"experiment_ids": [exp], "filter": f"tags.`duet.run_id` = '{run_id}'"})
    return got.get("runs", [])


def _history(base: str, run: str, key: str) -> dict[int, float]:
    got = _api(base, "metrics/get-history", run_id=run, metric_key=key, max_results=1000)
    return {m["step"]: m["value"] for m in got.get("metrics", [])}


def _wait_delivered(rdir: Path, names, timeout=240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        cur = {n: json.loads((rdir / "tracking" / f"{n}.json").read_text()) if (rdir / "tracking" / f"{n}.json").exists() else {}
               for n in names}
        if all(c.get("final") for c in cur.values()) and not _follower_alive(rdir):
            return cur
        time.sleep(0.5)
    log = (rdir / "tracking" / "follower.log").read_text() if (rdir / "tracking" / "follower.log").exists() else ""
    raise AssertionError(f"not delivered in {timeout} s: {cur}\n{log[-3000:]}")


def _follower_alive(rdir: Path) -> bool:
    from training.track.follow import held

    return (rdir / "tracking").is_dir() and held(rdir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # follow.start reaps its child, so an ended follower is gone, not a zombie
        return True
    except OSError:
        return False


def _kill_follower(rdir: Path) -> None:
    if _follower_alive(rdir):
        os.kill(int((rdir / "tracking" / "follower.pid").read_text()), signal.SIGKILL)


def test_a_run_reaches_every_tracker(tmp_path, engine_env, mlflow):
    env = engine_env(tmp_path)
    tracking = {"mlflow": {"tracking_uri": mlflow, "experiment": "every"}, "trackio": {"project": "duet-test",
                "dir": str(tmp_path / "trackio")}, "tensorboard": {"dir": str(tmp_path / "tb")}}
    state, rec, rdir = run_plan(env, "tracked", {**STEPS, "report_to": ["mlflow", "tensorboard", "trackio", "wandb"],
                                                 "tracking": tracking})
    assert state == "finished", rec.get("error")
    try:
        _wait_delivered(rdir, ["mlflow", "tensorboard", "trackio", "wandb"])
        entry = env[1].export("tracked", {"quant": "f16", "name": "tracked-f16"})  # later: an export reaches them too
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                json.loads((rdir / "tracking" / f"{n}.json").read_text()).get("exports_sent") for n in ("mlflow", "wandb")):
            time.sleep(0.5)
        cur = _wait_delivered(rdir, ["mlflow", "tensorboard", "trackio", "wandb"])
        segments = sorted((rdir / "tracking" / "wandb").rglob("run-tracked.wandb"))
        from training.track import follow

        pid = follow.start(rdir)  # as an executor restart does for ended runs: nothing to send, nothing reopened
        assert pid, "no follower started"
        deadline = time.time() + 60
        while time.time() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        assert not _pid_alive(pid)
        assert sorted((rdir / "tracking" / "wandb").rglob("run-tracked.wandb")) == segments
    finally:
        _kill_follower(rdir)
    steps = {x["step"]: x["loss"] for x in rec["losses"]}
    assert sorted(steps) == list(range(1, 7))

    # MLflow, read back through its REST API
    (run,) = _runs(mlflow, "every", "tracked")
    mid = run["info"]["run_id"]
    assert mid == cur["mlflow"]["run"]["run_id"] and run["info"]["status"] == "FINISHED"
    loss = _history(mlflow, mid, "train/loss")
    assert loss.keys() == steps.keys() and all(abs(loss[s] - steps[s]) < 1e-6 for s in steps)
    assert set(_history(mlflow, mid, "train/learning_rate")) == set(steps)
    assert _history(mlflow, mid, "eval/loss_after")[0] == pytest.approx(rec["eval_loss_after"])
    assert _history(mlflow, mid, "final/eval_loss_after")
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.learning_rate"] == str(rec["train_effective"]["learning_rate"])
    assert params["dataset.content_hash"] == rec["dataset"]["content_hash"]
    assert params["duet.code_sha"] == rec["code_sha"] and params["model"] == "tiny"
    assert not any("tracking" in k for k in params)
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    exported = json.loads(tags["duet.export.1"])
    assert exported["files"]["gguf"]["path"] == entry["files"]["gguf"]["path"]
    assert exported["verification"] == json.loads(json.dumps(entry["verification"], default=str))
    arts = _api(mlflow, "artifacts/list", run_id=mid)
    assert {"report.md", "loss.png", "plan.json"} <= {f["path"] for f in arts.get("files", [])}

    # TensorBoard, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(cur["tensorboard"]["run"]["logdir"])
    assert logdir.parent == tmp_path / "tb"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb.keys() == steps.keys() and all(abs(tb[s] - steps[s]) < 1e-5 for s in steps)

    # Trackio's local store, read back in a process of its own (Trackio reads TRACKIO_DIR at import)
    code = ("import json, trackio.sqlite_storage as s; "
            "print(json.dumps(s.SQLiteStorage.get_logs('duet-test', 'tracked')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")})
    assert out.returncode == 0, out.stderr[-2000:]
    logs = json.loads(out.stdout.strip().splitlines()[-1])
    tk = {e["step"]: e["train/loss"] for e in logs if "train/loss" in e}
    assert tk.keys() == steps.keys()

    # W&B offline: its run files, with the steps, in the run's tracking folder
    wb = list((rdir / "tracking" / "wandb").rglob("run-tracked.wandb"))
    assert wb, list((rdir / "tracking").rglob("*"))[:30]
    files = [f.read_bytes() for f in wb]  # the run's own, and one more segment of the same run id for the export
    assert any(b"train/loss" in f for f in files) and any(b"duet.export.1" in f for f in files)


def test_tracker_down_training_goes_on_and_the_backlog_arrives(tmp_path, engine_env, mlflow):
    port = services.free_port(range(5500, 5600))
    uri = f"http://127.0.0.1:{port}"
    env = engine_env(tmp_path)
    state, rec, rdir = run_plan(env, "down", {**STEPS, "report_to": ["mlflow"],
                                              "tracking": {"mlflow": {"tracking_uri": uri, "experiment": "down"}}})
    server = None
    try:
        assert state == "finished", rec.get("error")
        deadline = time.time() + 30  # the run ended while the tracker was down: the follower holds the backlog
        while time.time() < deadline and not (rdir / "tracking" / "status.json").exists():
            time.sleep(0.2)
        status = json.loads((rdir / "tracking" / "status.json").read_text())["mlflow"]
        assert status["up"] is False and "unreachable" in status["error"] and status["backlog_bytes"] > 0
        assert "warning: mlflow" in (rdir / "tracking" / "follower.log").read_text()
        from training.track.follow import StatusCollector

        fams = {f.name: f for f in StatusCollector(env[1].data_dir).collect()}
        assert [s.value for s in fams["duet_tracker_up"].samples if s.labels["run_id"] == "down"] == [0.0]

        server = _start_mlflow(tmp_path / "mlflow-late", port)  # the tracker comes up: everything arrives
        cur = _wait_delivered(rdir, ["mlflow"], timeout=180)
    finally:
        _kill_follower(rdir)
        if server is not None:
            _stop(server)
    assert cur["mlflow"]["final"] == "finished"
    st = json.loads((rdir / "tracking" / "status.json").read_text())["mlflow"]
    assert st["up"] is True and st["backlog_bytes"] == 0


def test_kill_and_resume_continue_the_same_mlflow_run(tmp_path, mlflow):
    from roles.architect import Architect
    from training.models import model_config
    from training.plan.hardware import probe

    ws = tmp_path / "ws"
    arch = Architect(str(ws), None, None, session_title="killed")
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    plan = arch.design_plan("demo", probe(ws).to_dict(), model_config("tiny"), "tiny", ds,
                            {"max_steps": 8, "checkpoint_every": 4, "eval_every": 100, "warmup_steps": 1,
                             "sample_prompts": 0, "report_to": ["mlflow"],
                             "tracking": {"mlflow": {"tracking_uri": mlflow, "experiment": "resumed"}}})
    cfg = ws / "configs" / f"{plan['run_id']}.yaml"
    run_env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cluster.cli", "train", str(cfg), "--run-id", "killed", "--json"]
    rdir = ws / ".duet" / "executor" / "runs" / "killed"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**run_env, "DUET_FAULT": "kill@step=6"})
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        deadline = time.time() + 60
        while time.time() < deadline and _follower_alive(rdir):
            time.sleep(0.5)
        assert not _follower_alive(rdir)  # nothing trains the run and everything is delivered: the follower ended
        first = json.loads((rdir / "tracking" / "mlflow.json").read_text())["run"]["run_id"]
        r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=run_env)
        assert r.returncode == 0, r.stderr[-3000:]
        cur = _wait_delivered(rdir, ["mlflow"])
    finally:
        _kill_follower(rdir)
    (run,) = _runs(mlflow, "resumed", "killed")  # one MLflow run, the same one
    assert run["info"]["run_id"] == first == cur["mlflow"]["run"]["run_id"] and run["info"]["status"] == "FINISHED"
    assert set(_history(mlflow, first, "train/loss")) == set(range(1, 9))
    assert _history(mlflow, first, "duet/recoveries")  # the resume, recorded as a recovery
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    kinds = [json.loads(v)["kind"] for k, v in tags.items() if k.startswith("duet.recovery.")]
    assert "resume" in kinds and "fault_injected" in kinds, kinds  # the kill (DUET_FAULT) and the resume
