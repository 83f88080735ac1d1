"""The child's side of a run in its own process (training/run/solo.py: Bridge): each change of the
executor's control.json reaches the Run once, and a steady control file never undoes the child's own
decisions (a thermal pause the watchdog took)."""

import json

from training.run import solo


class FakeRun:
    """Records what the Bridge asks of a Run (a stand-in for training/run/engine.Run)."""

    def __init__(self, d):
        self.dir, self.calls, self.watchdog = d, [], None
        self.progress, self.state = {"step": 3}, "training"

    def emit(self, _event, **payload):  # what progress.json held when the event was written
        self.calls.append(f"emit:{_event}")
        self.seen_with_event = json.loads((self.dir / "progress.json").read_text())["progress"]

    def cancel(self):
        self.calls.append("cancel")

    def pause(self, reason="user"):
        self.calls.append(f"pause:{reason}")

    def resume(self):
        self.calls.append("resume")


def control(d, **kw):
    (d / "control.json").write_text(json.dumps({"cancel": False, "pause": False, **kw}))


def test_each_change_reaches_the_run_once_and_progress_is_written(tmp_path):
    run = FakeRun(tmp_path)
    b = solo.Bridge(run)
    control(tmp_path)
    b.sync()
    b.sync()
    assert run.calls == []  # nothing asked: a thermal pause of the child's own stays as it is
    control(tmp_path, pause=True)
    b.sync()
    b.sync()
    control(tmp_path, pause=False)
    b.sync()
    control(tmp_path, cancel=True)
    b.sync()
    b.sync()
    assert run.calls == ["pause:user", "resume", "cancel"]
    prog = json.loads((tmp_path / "progress.json").read_text())
    assert prog["progress"] == {"step": 3} and prog["state"] == "training" and prog["host"]["rss"] > 0 and prog["pid"]


def test_a_missing_or_damaged_control_file_asks_nothing(tmp_path):
    run = FakeRun(tmp_path)
    b = solo.Bridge(run)
    b.sync()
    (tmp_path / "control.json").write_text("{not json")
    b.sync()
    assert run.calls == []


def test_how_a_child_ended_is_said_in_words():
    assert solo.ended_by(-9) == "signal SIGKILL" and solo.ended_by(-11) == "signal SIGSEGV"
    assert solo.ended_by(1) == "exit status 1"


def test_an_event_is_written_after_the_progress_it_goes_with(tmp_path):
    """The executor reads events, then progress.json: a paused run must show the step it paused at."""
    run = FakeRun(tmp_path)
    b = solo.Bridge(run)
    b.sync()
    run.progress = {"step": 8}  # a step ended, then the run pauses before the next quarter-second write
    run.emit("state", state="paused")
    assert run.seen_with_event == {"step": 8}
