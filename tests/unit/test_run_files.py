"""A run's event payloads stay strict JSON (a NaN loss's alert must not stop the session log)."""

import json
import math

from training.run.run_files import finite


def test_non_finite_numbers_become_null():
    doc = {"value": math.nan, "threshold": math.inf, "ok": 1.5, "nested": [{"x": -math.inf}, 2, "nan"]}
    out = finite(doc)
    assert out == {"value": None, "threshold": None, "ok": 1.5, "nested": [{"x": None}, 2, "nan"]}
    json.dumps(out, allow_nan=False)  # strict JSON now


def test_a_long_runs_losses_stay_bounded_in_memory_and_whole_on_disk(tmp_path, monkeypatch):
    """Past twice LOSS_WINDOW logged steps only the newest LOSS_WINDOW stay in memory; all_losses()
    and the series a viewer gets are whole (from losses.jsonl), a resume's roll-back honoured."""
    import threading

    from training.run import engine
    from training.run.executor import points_after

    monkeypatch.setattr(engine, "LOSS_WINDOW", 5)
    run = object.__new__(engine.Run)
    run.dir, run._lock, run.losses, run._trimmed, run._cut = tmp_path, threading.Lock(), [], False, None
    run.eval_losses, run.checkpoints = [], []
    for s in range(1, 31):
        run.log_loss({"step": s, "loss": 1.0 / s, "time": float(s)})
    assert len(run.losses) <= 10 and [x["step"] for x in run.all_losses()] == list(range(1, 31))
    run.drop_losses_after(3)  # a resume from a checkpoint older than what memory holds
    assert [x["step"] for x in run.all_losses()] == [1, 2, 3]
    for s in range(4, 9):
        run.log_loss({"step": s, "loss": 2.0, "time": 100.0 + s})
    got = run.all_losses()
    assert [x["step"] for x in got] == list(range(1, 9)) and got[-1]["loss"] == 2.0
    assert points_after(got, 8, 108.0) == (False, 8)
