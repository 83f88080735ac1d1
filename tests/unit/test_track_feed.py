"""What a run's folder tells its trackers (training/track/feed.py) and the report_to fields."""

import json

import pytest

from training.config import TrainConfig
from training.track import feed


def test_tail_reads_whole_lines_only_and_resumes_at_its_offset(tmp_path):
    f = tmp_path / "losses.jsonl"
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # the last line is being written
    rows, off = feed.tail(f, 0)
    assert [r["step"] for r in rows] == [1, 2] and off == len('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert feed.tail(f, off) == ([], off)
    with open(f, "a") as fh:
        fh.write('ss": 1.2}\nnot json\n{"step": 4, "loss": 1.1}\n')
    rows, off2 = feed.tail(f, off)
    assert [r["step"] for r in rows] == [3, 4] and off2 == f.stat().st_size  # a torn line is skipped
    assert feed.tail(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_step_metrics_keep_finite_numbers_under_tracker_names():
    got = feed.step_metrics({"step": 3, "loss": 1.25, "learning_rate": 1e-4, "grad_norm": float("inf"),
                             "tokens_per_second": 900, "rss_bytes": 10, "gpu_throttle": ["hw_slowdown"], "pid": 4})
    assert got == {"train/loss": 1.25, "train/learning_rate": 1e-4, "train/tokens_per_second": 900.0,
                   "memory/rss_bytes": 10.0}


def test_events_become_metrics_or_recoveries():
    assert feed.event_item({"event": "eval", "which": "step 5", "step": 5, "eval_loss": 1.5}) == ("metrics", 5, {"eval/loss": 1.5})
    assert feed.event_item({"event": "eval", "which": "after", "eval_loss": 1.2})[2] == {"eval/loss_after": 1.2}
    kind, step, vals = feed.event_item({"event": "oom", "seq": 4, "step": 9, "run_id": "r", "kind": "oom",
                                        "change": "micro_batch 4 -> 2", "time": 5.0})
    assert (kind, step, vals["kind"], vals["detail"]["change"]) == ("recovery", 9, "oom", "micro_batch 4 -> 2")
    assert feed.event_item({"event": "checkpoint", "step": 3}) is None


def test_params_carry_the_plan_and_provenance_and_never_the_tracking_settings(tmp_path):
    train = TrainConfig(name="p", report_to=["mlflow"], tracking={"mlflow": {"tracking_uri": "http://h:1"}}).model_dump()
    spec = {"plan": {"train": train, "device": "cpu", "dtype": "fp32", "estimate": {"total_bytes": 123}},
            "dataset": {"name": "persona", "content_hash": "ab" * 32}, "model_ref": "tiny",
            "placement": {"group": "sweep-1"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    p = feed.params(tmp_path)
    assert p["train.learning_rate"] == str(train["learning_rate"]) and p["plan.estimate_bytes"] == "123"
    assert p["dataset.content_hash"] == "ab" * 32 and p["model"] == "tiny" and p["duet.sweep_id"] == "sweep-1"
    tm = train["lora"]["target_modules"]
    assert p["train.lora.target_modules"] == (json.dumps(tm) if isinstance(tm, list) else str(tm))
    assert not [k for k in p if "tracking" in k or "report_to" in k]
    assert "tracking" not in feed.plan_document(tmp_path)["train"]


@pytest.mark.parametrize("value,words", [(["neptune"], "unknown tracker 'neptune'"), (["mlflow", "mlflow"], "twice"),
                                         ({"a": 1}, "give a list"), ([3], "unknown tracker 3")])
def test_report_to_names_only_known_trackers(value, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(name="p", report_to=value)
    assert TrainConfig(name="p", report_to="none").report_to == [] == TrainConfig(name="p").report_to
