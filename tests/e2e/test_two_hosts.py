"""Two Ray nodes as two hosts on this machine: 127.0.0.2 (GPU host: head, executor) and 127.0.0.3
(design host: architect), started with `duet node start` / `duet node join`, token auth on."""

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


def duet(*args, env=None, timeout=240):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(DUET + list(args), capture_output=True, text=True, timeout=timeout, env=e)


def ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else r.stdout


class Cluster:
    def __init__(self, tmp: Path, port: int):
        self.tmp, self.port = tmp, port
        self.address = f"127.0.0.2:{port}"
        self.ws = tmp / "ws"
        self.data = tmp / "executor-data"

    def start_head(self, *extra):
        return ok(duet("node", "start", "--role", "executor", "--head", "--bind", "127.0.0.2", "--port", str(self.port),
                       "--data-dir", str(self.data), "--metrics-port", str(self.port + 2000), "--json", *extra))

    def join_architect(self, env=None):
        return ok(duet("node", "join", "--role", "architect", "--address", self.address, "--bind", "127.0.0.3",
                       "--workspace", str(self.ws), "--json", env=env))

    def nodes(self) -> dict:
        from cluster import two_host

        return two_host.local_nodes()

    def raylet_of(self, key: str) -> int:
        pid = self.nodes()[key]["pid"]
        for c in psutil.Process(pid).children(recursive=True):
            if c.name() == "raylet":
                return c.pid
        raise AssertionError(f"no raylet under {key}")

    def run_state(self, run_id):
        r = duet("runs", "show", run_id, "--address", self.address, "--workspace", str(self.ws), "--json")
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"state": "unreachable", "progress": {"step": -1}, "rc": r.returncode, "out": r.stdout[-300:],
                    "err": r.stderr[-800:]}

    def stop(self):
        duet("node", "stop", "--all")


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, 6411)
    yield c
    c.stop()
    from cluster import two_host

    assert not any(v["alive"] for v in two_host.local_nodes().values())


def submit(c: Cluster, steps: int, every: int) -> str:
    cfg = c.tmp / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{REPO / 'examples/persona/persona.jsonl'}]\ndataset: persona\n"
                   f"overrides: {{max_steps: {steps}, checkpoint_every: {every}, eval_every: {every}, sample_prompts: 1, "
                   f"max_new_tokens: 8, micro_batch: 2}}\n")
    return ok(duet("run", str(cfg), "--detach", "--address", c.address, "--workspace", str(c.ws), "--json"))["run_id"]


def wait_state(c, run_id, pred, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.run_state(run_id)
        if pred(st):
            return st
        time.sleep(0.5)
    raise AssertionError(f"timed out; last state {st}")


def test_roles_land_on_their_hosts_and_strangers_are_refused(cluster, tmp_path):
    head = cluster.start_head("--dashboard", "--dashboard-bind", "127.0.0.2", "--workspace", str(cluster.ws))
    assert head["actor"]["role"] == "executor" and "duet node join" in head["join"]
    dash = head["dashboard"]  # the web view started with the head, on its address, behind the login
    assert dash["bind"] == "127.0.0.2" and dash["login_url"].startswith(f"http://127.0.0.2:{dash['port']}/login?token=")
    token = Path(head["token_file"])
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    joined = cluster.join_architect()
    assert joined["versions"]["checked"] and joined["versions"]["head"] == joined["versions"]["local"]
    st = ok(duet("status", "--workspace", str(cluster.ws), "--json"))["cluster"]
    roles = {n["address"]: n["roles"] for n in st["nodes"] if n["alive"]}
    assert roles == {"127.0.0.2": ["executor"], "127.0.0.3": ["architect"]}
    where = {a["name"]: a["address"] for a in st["actors"]}
    assert where == {"duet-executor": "127.0.0.2", "duet-architect": "127.0.0.3", "duet-scheduler": "127.0.0.2"}

    import http.cookiejar
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(dash["url"] + "cluster", timeout=30)
    op = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    op.open(dash["login_url"], timeout=60).read()
    page = op.open(dash["url"] + "cluster", timeout=60).read().decode()
    assert "127.0.0.3" in page and "architect" in page and "duet-executor" in page

    # a client with a wrong token, and one with no token at all, are refused
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    r = duet("node", "join", "--client", "--address", cluster.address, "--token-file", str(wrong), "--json")
    assert r.returncode == 3
    plain = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{cluster.address}')"],
                           capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")})
    assert plain.returncode != 0 and ("uthentication" in plain.stderr or "Failed to connect" in plain.stderr)

    # a version mismatch is refused, naming both versions (simulated by configuration)
    r = duet("node", "join", "--role", "architect", "--address", cluster.address, "--bind", "127.0.0.4",
             env={"DUET_VERSION_OVERRIDES": '{"ray": "2.59.0"}'})
    assert r.returncode == 2
    assert "ray: 2.59.0 here, 2.60.0 on the head" in r.stderr
    stopped = ok(duet("node", "stop", "--all", "--json"))["stopped"]
    assert f"dashboard-head-127.0.0.2-{cluster.port}" in stopped  # the dashboard goes with its node
    from infra.services import port_open

    assert not port_open(dash["port"], "127.0.0.2")


def test_dead_head_join_times_out_clearly(tmp_path):
    t0 = time.time()
    r = duet("node", "join", "--role", "architect", "--address", "127.0.0.2:6499", "--bind", "127.0.0.3",
             "--timeout", "5")
    assert r.returncode == 3 and "no Ray head answers at 127.0.0.2:6499" in r.stderr
    assert time.time() - t0 < 60


def test_executor_node_dies_mid_run_and_the_run_resumes_when_it_is_back(cluster):
    cluster.start_head()
    cluster.join_architect()
    run_id = submit(cluster, steps=400, every=20)
    wait_state(cluster, run_id, lambda s: s["state"] == "training" and s["progress"]["step"] >= 45)
    head_key = f"head-127.0.0.2-{cluster.port}"
    head_pid = cluster.nodes()[head_key]["pid"]
    os.kill(cluster.raylet_of(head_key), signal.SIGKILL)  # the GPU host's raylet dies ...
    assert psutil.wait_procs([psutil.Process(head_pid)], timeout=60)[0]  # ... and `ray start --block` takes the node down
    logged = (cluster.data / "runs" / run_id / "losses.jsonl").read_text().splitlines()
    last_step = max(json.loads(x)["step"] for x in logged)
    ok(duet("node", "stop", "--all", "--json"))  # clear what is left (the architect lost its head too)
    # the GPU host comes back: `duet node start` again; the executor actor resumes the run on its own
    t_back = time.time()
    cluster.start_head()
    st = wait_state(cluster, run_id, lambda s: s["state"] == "training" and s["progress"]["step"] > 40)
    failover_s = time.time() - t_back
    cluster.join_architect()  # the design host reconnects
    st = wait_state(cluster, run_id, lambda s: s["state"] in ("finished", "failed"), timeout=400)
    assert st["state"] == "finished", st
    st = wait_state(cluster, run_id, lambda s: s["recorded"]["state"] == "recorded", timeout=90)
    rec = json.loads((cluster.ws / "runs" / run_id / "run.json").read_text())
    events = [json.loads(x) for x in (cluster.ws / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    resumes = [e for e in events if e["event"] == "resume"]
    newest = last_step // 20 * 20  # the newest checkpoint at death (or the one before, if it died mid-save)
    assert resumes and int(resumes[-1]["checkpoint"].split("-")[-1]) in {newest, newest - 20}
    assert sorted(x["step"] for x in rec["losses"]) == list(range(1, 401))
    assert st["recorded"]["by"].startswith("recorder")  # the architect's recorder, no command typed
    (cluster.tmp / "failover.json").write_text(json.dumps({"failover_s": failover_s}))
    print(f"failover (node back -> training again): {failover_s:.1f} s")


def recorded_within(ws: Path, run_id: str, seconds: float) -> float:
    """Seconds until runs/<id>/run.json appears in ``ws`` (AssertionError after ``seconds``), polling the
    files only: nothing is typed that could record it."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        if (ws / "runs" / run_id / "run.json").exists():
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"{run_id} not recorded in {ws} within {seconds} s")


def assert_recorded_everywhere(ws: Path, run_id: str, db: dict) -> None:
    """The run record, its git commit, a session event, the cortex's runs and the neocortex's events."""
    from memory_sync.cortex import Cortex
    from memory_sync.neocortex import Neocortex

    assert json.loads((ws / "runs" / run_id / "run.json").read_text())["status"] == "finished"
    deadline = time.time() + 30  # the commit follows the files by a moment
    while time.time() < deadline:
        log = subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True, text=True).stdout
        if f"run: {run_id} finished" in log and "session:" in log.split(f"run: {run_id}")[0]:
            break
        time.sleep(0.5)
    assert f"run: {run_id} finished" in log, log
    events = [json.loads(x) for f in (ws / "sessions").glob("*/events.jsonl") for x in f.read_text().splitlines()]
    assert any(e["payload"].get("step") == "run recorded" and e["payload"].get("run_id") == run_id for e in events)
    c = Cortex(db["postgres_url"])
    n = Neocortex(db["mongo_url"])
    try:
        assert any(r.get("run_id") == run_id or r.get("id") == run_id for r in c.dump("runs"))
        assert any(e.get("payload", {}).get("run_id") == run_id for e in n.dump("events"))
    finally:
        c.close()
        n.close()


def test_a_run_that_ends_while_the_design_host_is_away_is_recorded_when_it_joins_again(cluster, fresh_db):
    """The laptop submits a detached run and leaves (its node stops); the run finishes on the GPU host;
    the laptop joins again and, with no command typed, the run is in its workspace within 90 s: record,
    commit, session event, both stores."""
    env = {"DUET_POSTGRES_URL": fresh_db["postgres_url"], "DUET_MONGO_URL": fresh_db["mongo_url"]}
    cluster.start_head()
    cluster.join_architect(env)
    run_id = submit(cluster, steps=300, every=100)
    # the laptop leaves as soon as the head has the run: the run's load, evaluation and 300 steps outlast
    # `duet node stop` (waiting for step 2 first let a 200-step run finish while the stop was still going)
    stopped = ok(duet("node", "stop", "--json"))["stopped"]  # the newest node: the laptop's; the head stays
    assert stopped == ["architect-127.0.0.3"], stopped
    assert cluster.run_state(run_id)["state"] not in ("finished", "failed"), "the run ended before the laptop left"
    st = wait_state(cluster, run_id, lambda s: s["state"] in ("finished", "failed"), timeout=400)
    assert st["state"] == "finished", st
    assert st["recorded"] == {"in_workspace": False, "state": "pending"}, st  # the head knows; nobody wrote
    time.sleep(3)
    assert not (cluster.ws / "runs" / run_id).exists()
    t_back = time.time()
    joined = cluster.join_architect(env)  # the laptop is back: the join returns once what ended is recorded
    waited = recorded_within(cluster.ws, run_id, 90 - (time.time() - t_back))
    assert waited < 1, waited
    assert joined["actor"]["recorder"]["workspace"] == str(cluster.ws.resolve())
    assert_recorded_everywhere(cluster.ws, run_id, fresh_db)
    st = cluster.run_state(run_id)
    assert st["recorded"]["state"] == "recorded" and st["recorded"]["by"].startswith("recorder")
    print(f"recorded {time.time() - t_back:.1f} s after the join ({waited:.1f} s after it returned)")
    # once: joining again records nothing twice
    ok(duet("node", "stop", "--json"))
    cluster.join_architect(env)
    time.sleep(5)
    log = subprocess.run(["git", "log", "--format=%s"], cwd=cluster.ws, capture_output=True, text=True).stdout
    assert log.count(f"run: {run_id} finished") == 1


def test_design_host_that_cannot_join_drives_the_run_as_a_client(cluster):
    """No architect node: the design host connects through the head's Ray Client port; the architect
    runs on the head (in a workspace there), the CLI uploads the data; the record lands on both sides."""
    head = cluster.start_head()
    client = head["client_address"]
    assert client == f"ray://127.0.0.2:{cluster.port + 1}"
    checked = ok(duet("node", "join", "--client", "--address", client, "--json"))
    assert checked["versions"]["checked"] and checked["executor"]
    r = duet("node", "join", "--client", "--address", client, env={"DUET_VERSION_OVERRIDES": '{"duet": "0.0.1"}'})
    assert r.returncode == 2 and "duet: 0.0.1 here" in r.stderr

    data = cluster.tmp / "mine" / "notes.jsonl"  # a file only the design host has
    data.parent.mkdir()
    data.write_bytes((REPO / "examples/persona/persona.jsonl").read_bytes())
    cfg = cluster.tmp / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{data}]\ndataset: notes\n"
                   "overrides: {max_steps: 12, checkpoint_every: 6, eval_every: 6, sample_prompts: 1, "
                   "max_new_tokens: 4, micro_batch: 2}\n")
    out = ok(duet("run", str(cfg), "--address", client, "--workspace", str(cluster.ws), "--json"))
    assert out["steps"] == 12 and out["metrics_final"]  # metrics came through the actor, not a loopback port
    run_id = out["run_id"]
    head_ws = cluster.data.parent / "client-workspaces" / cluster.ws.name
    assert (head_ws / "uploads" / "notes" / "notes.jsonl").read_bytes() == data.read_bytes()
    assert (head_ws / "runs" / run_id / "run.json").exists()  # the architect recorded it on the head ...
    assert json.loads((cluster.ws / "runs" / run_id / "run.json").read_text())["status"] == "finished"  # ... and here
    st = ok(duet("status", "--address", client, "--json"))["cluster"]
    assert [n["roles"] for n in st["nodes"] if n["alive"]] == [["executor"]]

    # a preset file of the laptop's, a detached run, no driver: the preset's content travelled with the
    # request (the head plans with it), and the run is recorded in the head's workspace with no command
    preset = cluster.tmp / "mine" / "quick.yaml"
    preset.write_text((REPO / "training/presets/demo.yaml").read_text().replace("name: demo", "name: quick")
                      .replace("learning_rate: 1.0e-3", "learning_rate: 7.0e-4"))
    cfg.write_text(f"preset: mine/quick.yaml\nmodel: tiny\ndata: [{data}]\ndataset: notes\n"
                   "overrides: {max_steps: 12, checkpoint_every: 6, eval_every: 6, sample_prompts: 1, "
                   "max_new_tokens: 4, micro_batch: 2}\n")
    sub = ok(duet("run", str(cfg), "--detach", "--address", client, "--workspace", str(cluster.ws), "--json"))
    run_id = sub["run_id"]
    assert run_id.startswith("quick-")
    plan = (head_ws / "configs" / f"{run_id}.yaml").read_text()
    assert "learning_rate: 0.0007" in plan and "mine/" not in plan
    recorded_within(head_ws, run_id, 240)
    rec = json.loads((head_ws / "runs" / run_id / "run.json").read_text())
    assert rec["status"] == "finished" and rec["config"]["train"]["learning_rate"] == 7e-4
    assert not (cluster.ws / "runs" / run_id).exists()  # the laptop was away (no process of it ran)
    back = ok(duet("node", "join", "--client", "--address", client, "--workspace", str(cluster.ws), "--json"))
    assert [r["run_id"] for r in back["recorded"]] == [run_id]  # it comes back: the run is copied to it
    assert json.loads((cluster.ws / "runs" / run_id / "run.json").read_text())["status"] == "finished"
    again = ok(duet("node", "join", "--client", "--address", client, "--workspace", str(cluster.ws), "--json"))
    assert again["recorded"] == []
