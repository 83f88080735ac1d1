"""The dashboard in a real headless browser (Debian's chromium through selenium) against a real tiny run
on the embedded cluster: the run appears, its loss chart gains points while it trains, pause stops the
step counter and resume restarts it, cancel ends it; the dataset page shows the quarantine reasons of a
dataset with bad records; the session page shows the handoff. Screenshots go to $DUET_SCREENSHOTS (or
the test's temporary folder); docs/dashboard/ holds the ones the README shows."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser import chrome, js_errors, wait_for

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def duet(*args, cwd, timeout=300):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def messy_dataset(repo_root: Path, out: Path) -> Path:
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()[:20]
    bad = [json.dumps({"id": "no-answer", "messages": [{"role": "user", "content": "hello?"}]}),
           json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}),
           json.dumps({"id": "gossip-1", "messages": [{"role": "user", "content": "tell me"},
                                                      {"role": "assistant", "content": "no"}],
                       "metadata": {"category": "gossip"}})]
    out.write_text("\n".join(lines + bad) + "\n")
    return out


def recorded_run(ws: Path) -> str:
    """A run record as the architect commits it (runs/<id>/run.json), of a run no executor holds any more."""
    run_id = "earlier-run"
    d = ws / "runs" / run_id
    d.mkdir(parents=True)
    losses = [{"step": s, "loss": 6.2 - 0.01 * s, "time": 1.0e9 + s} for s in range(1, 41)]
    (d / "run.json").write_text(json.dumps({
        "run_id": run_id, "status": "finished", "steps": 40, "started": 1.0e9, "phase": "sft", "name": "demo",
        "config": {"train": {"max_steps": 40}}, "losses": losses, "eval_losses": [{"step": 40, "eval_loss": 5.9}],
        "eval_loss_after": 5.9}))
    return run_id


def test_dashboard_follows_and_controls_a_live_run(tmp_path, repo_root):
    """Long because one cluster serves the whole journey: bringing it up costs more than each check."""
    shots = Path(os.environ.get("DUET_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    ws = tmp_path / "ws"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{repo_root / 'examples/persona/persona.jsonl'}]\n"
                   "dataset: persona\noverrides: {max_steps: 4000, checkpoint_every: 200, eval_every: 100, "
                   "sample_prompts: 1}\n")
    up = json.loads(duet("up", "--dashboard", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)
    dash = up["dashboard"]
    assert dash["bind"] == "127.0.0.1" and "token=" in dash["login_url"]
    driver = None
    try:
        cur = json.loads(duet("data", "curate", str(messy_dataset(repo_root, tmp_path / "messy.jsonl")), "--name",
                              "messy", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)
        sid = duet("session", "start", "dashboard check", "--workspace", str(ws), cwd=tmp_path).stdout.strip()
        duet("session", "decide", sid, "train the tiny model first", "--why", "fast feedback", "--workspace", str(ws),
             cwd=tmp_path)
        duet("session", "state", sid, "--next", "export the best run to GGUF", "--workspace", str(ws), cwd=tmp_path)
        run_id = json.loads(duet("run", str(cfg), "--detach", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)["run_id"]

        driver = chrome()
        driver.get(dash["login_url"])
        base = dash["url"].rstrip("/")
        # the landing page: the runs list with the run, and its live loss chart gaining points
        wait_for(lambda: run_id in driver.find_element("id", "runs-table").text, what="the run in the runs table")
        n0 = wait_for(lambda: driver.execute_script("return window.duetRun && window.duetRun.points.length"),
                      what="loss points on the landing chart")
        wait_for(lambda: driver.execute_script("return window.duetRun.points.length") > n0 + 20,
                 what="the landing chart gaining points")
        driver.save_screenshot(str(shots / "runs.png"))

        # the run page: live charts, then pause, resume and cancel through the buttons
        driver.get(f"{base}/runs/{run_id}")
        step = lambda: int(driver.find_element("id", "step").text or 0)  # noqa: E731
        s0 = wait_for(step, what="the step counter")
        wait_for(lambda: step() > s0 + 20, what="the step counter moving")
        pts = driver.execute_script("return window.duetRun.points.length")
        wait_for(lambda: driver.execute_script("return window.duetRun.points.length") > pts, what="new chart points")
        arrivals = driver.execute_script("return window.duetRun.arrivals.length")
        assert arrivals > 0  # points came through the stream, not only the first load
        driver.find_element("id", "pause").click()
        wait_for(lambda: driver.find_element("id", "state").text == "paused", what="state paused")
        held = step()
        time.sleep(2.5)
        assert step() == held, "the step counter moved while paused"
        assert driver.find_element("id", "resume").is_enabled() and not driver.find_element("id", "pause").is_enabled()
        driver.find_element("id", "resume").click()
        wait_for(lambda: driver.find_element("id", "state").text == "training", what="state training again")
        wait_for(lambda: step() > held + 10, what="the step counter moving after resume")
        events = driver.find_element("id", "events").text
        assert "paused" in events and "training" in events
        wait_for(lambda: step() >= 320, what="a few hundred steps (evals and a checkpoint on the charts)")
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / "run.png"))
        driver.find_element("id", "cancel").click()
        wait_for(lambda: driver.find_element("id", "state").text == "cancelled", timeout=120, what="state cancelled")
        assert not js_errors(driver), js_errors(driver)

        # two runs on one chart: this one and one the workspace recorded, ticked in the runs list
        other = recorded_run(ws)
        driver.get(base + "/")
        for rid in (run_id, other):
            wait_for(lambda: driver.find_element("css selector", f'input.pick[value="{rid}"]'), what=f"{rid} listed").click()
        driver.find_element("id", "compare-btn").click()
        pts = wait_for(lambda: driver.execute_script("return window.duetCompare && window.duetCompare.points"),
                       what="the comparison drawn")
        assert pts[0] > 300 and pts[1] == 40, pts
        driver.save_screenshot(str(shots / "compare.png"))

        # the dataset with bad records: its quarantine and the reasons
        driver.get(f"{base}/datasets")
        driver.find_element("link text", cur["content_hash"][:12]).click()
        q = wait_for(lambda: driver.find_element("id", "quarantine").text, what="the quarantine table")
        assert "messy.jsonl:21" in q and "messages" in q and "missing" in q and "'gossip' is not one of" in q
        driver.save_screenshot(str(shots / "dataset.png"))

        # the session: its handoff, decision and resume context
        driver.get(f"{base}/sessions")
        driver.find_element("link text", sid).click()
        handoff = wait_for(lambda: driver.find_element("id", "handoff").text, what="the handoff")
        assert "export the best run to GGUF" in handoff and "train the tiny model first" in handoff
        assert "%" in driver.find_element("id", "saturation").text
        driver.save_screenshot(str(shots / "session.png"))

        driver.get(f"{base}/cluster")
        assert "head" in wait_for(lambda: driver.find_element("id", "executors").text, what="the executors")
        driver.save_screenshot(str(shots / "cluster.png"))
        assert not js_errors(driver), js_errors(driver)
        print(f"screenshots in {shots}")
    finally:
        if driver is not None:
            driver.quit()
        down = duet("down", "--workspace", str(ws), "--json", cwd=tmp_path)
        assert "dashboard" in json.loads(down.stdout)["stopped"]


def test_the_dashboard_outlives_its_head(tmp_path):
    """The head goes away (a GPU host rebooting): the dashboard keeps answering with what the workspace
    holds, its server is started again when Ray ends it (here after 3 s without the head instead of
    Ray's 60), and it is back on the cluster once the head is."""
    import urllib.request

    from cluster import ray_node

    env_ray = {"RAY_gcs_rpc_server_reconnect_timeout_s": "3"}
    os.environ.update(env_ray)
    ws = tmp_path / "ws"
    try:
        dash = json.loads(duet("up", "--dashboard", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)["dashboard"]
        import http.cookiejar

        op = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        op.open(dash["login_url"], timeout=60).read()
        page = lambda p: op.open(dash["url"].rstrip("/") + p, timeout=60).read().decode()  # noqa: E731
        assert "executor, architect" in page("/cluster")
        assert ray_node.stop_node(ws / ".duet", "head")
        assert "does not answer" in page("/")
        time.sleep(8)  # Ray ends the server's driver; the supervisor starts it again
        log = (ws / ".duet" / "dashboard.log").read_text()
        assert "starting it again" in log
        assert "does not answer" in wait_for(lambda: page("/"), what="the dashboard answering again")
        duet("up", "--workspace", str(ws), cwd=tmp_path)
        wait_for(lambda: "executor, architect" in page("/cluster"), timeout=60, what="the dashboard back on the cluster")
        assert "does not answer" not in page("/")
    finally:
        for k in env_ray:
            os.environ.pop(k, None)
        duet("down", "--workspace", str(ws), cwd=tmp_path)
