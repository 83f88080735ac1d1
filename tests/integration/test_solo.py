"""A run in a process of its own (training/run/solo.py), as the executor's actor trains every run: the
executor follows the child through the run's folder, its pause, resume and cancel reach the child, and a
child killed by a signal (the kernel's OOM killer, a segfault in a kernel) is a recovery from the newest
checkpoint, never the executor's end."""

import json
import os
import signal
import time

import psutil
import pytest

from tests.browser import wait_for as poll
from tests.runs import submit_plan

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory, engine_env):
    arch, ex, ds = engine_env(tmp_path_factory.mktemp("solo"))
    ex.process_per_run = True

    def submit(run_id: str, **train) -> str:
        return submit_plan((arch, ex, ds), run_id, {"checkpoint_every": 5, "eval_every": 50, **train})
    return ex, submit


def wait_for(ex, run_id, pred, timeout=300):
    """The run's status once ``pred`` holds for it."""
    def ready():
        st = ex.status(run_id)
        return st if pred(st) else None
    return poll(ready, timeout=timeout, interval=0.1, what=f"run {run_id}")


def events_on_disk(ex, run_id):
    return [json.loads(x) for x in (ex.data_dir / "runs" / run_id / "events.jsonl").read_text().splitlines()]


def test_the_run_trains_in_a_child_process_and_the_executor_mirrors_it(env):
    ex, submit = env
    run_id = submit("child", max_steps=12, eval_every=5)
    st = wait_for(ex, run_id, lambda s: s["progress"]["step"] >= 2)
    pid = ex.runs[run_id].child_pid
    assert pid and pid != os.getpid() and psutil.Process(pid).ppid() == os.getpid()
    assert ex.watch(run_id)["process_rss_bytes"] == pytest.approx(psutil.Process(pid).memory_info().rss, rel=0.5)
    assert ex.wait(run_id, 600) == "finished", ex.status(run_id)["error"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    rec = json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    assert rec["status"] == "finished" and rec["steps"] == 12 and [x["step"] for x in rec["losses"]] == list(range(1, 13))
    st = ex.status(run_id)
    assert st["events"] == events_on_disk(ex, run_id)  # every event of the child, in order, nothing twice
    assert [e["seq"] for e in st["events"]] == list(range(len(st["events"])))
    assert st["result"]["eval_loss_after"] == rec["eval_loss_after"] and st["result"]["merged_model"]
    assert ex.series(run_id)["eval"] == rec["eval_losses"] and len(ex.runs[run_id].losses) == 12
    from training.run import telemetry  # this process publishes what the child trained

    m = telemetry.metrics()
    assert m["step"].labels(run_id, "sft")._value.get() == 12 and m["state"].labels(run_id, "sft", "finished")._value.get() == 1
    assert m["rss_peak"]._value.get() > 0


def test_pause_resume_and_cancel_reach_the_child(env):
    ex, submit = env
    run_id = submit("controlled", max_steps=400)
    wait_for(ex, run_id, lambda s: s["progress"]["step"] >= 3)
    ex.pause(run_id)
    st = wait_for(ex, run_id, lambda s: s["state"] == "paused")
    step = st["progress"]["step"]  # the progress read with the state event is the paused step's (what a page shows)
    time.sleep(2)
    assert ex.status(run_id)["progress"]["step"] == step  # the child waits, its checkpoint written
    assert any(c["step"] == step for c in events_on_disk(ex, run_id) if c["event"] == "checkpoint")
    ex.resume(run_id)
    wait_for(ex, run_id, lambda s: s["state"] == "training" and s["progress"]["step"] > step + 2)
    pid = ex.runs[run_id].child_pid
    ex.cancel(run_id)
    assert ex.wait(run_id, 120) == "cancelled"
    assert ex.status(run_id)["progress"]["step"] < 400
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_child_killed_by_a_signal_resumes_from_its_newest_checkpoint(env, sig):
    ex, submit = env
    run_id = submit(f"killed-{sig.name.lower()}", max_steps=30)
    wait_for(ex, run_id, lambda s: s["progress"]["step"] >= 12)
    pid = ex.runs[run_id].child_pid
    os.kill(pid, sig)
    assert ex.wait(run_id, 600) == "finished", ex.status(run_id)["error"]
    rec = json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    restart = [r for r in rec["recoveries"] if r["kind"] == "process_restart"]
    assert len(restart) == 1 and restart[0]["signal"] == f"signal {sig.name}", rec["recoveries"]
    resumes = [e for e in events_on_disk(ex, run_id) if e["event"] == "resume"]
    assert resumes and resumes[-1]["checkpoint"].endswith(("checkpoint-10", "checkpoint-15"))
    assert [x["step"] for x in rec["losses"]] == list(range(1, 31))
    assert ex.runs[run_id].child_pid is None


def test_a_child_that_cannot_start_fails_the_run_with_its_output(env, monkeypatch):
    ex, submit = env
    from training.run import solo

    monkeypatch.setattr(solo, "child_command", lambda d, r: [solo.sys.executable, "-c", "raise SystemExit('no torch here')"])
    run_id = submit("broken", max_steps=5)
    assert ex.wait(run_id, 60) == "failed"
    err = ex.status(run_id)["error"]
    assert "exit status 1" in err and "no torch here" in err
    assert json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())["status"] == "failed"
