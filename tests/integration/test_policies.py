"""The executor's recovery policies, in process (the Prometheus counters are this process's)."""

import time

import pytest
from prometheus_client import REGISTRY

from tests.runs import run_plan


pytestmark = pytest.mark.integration
BASE = {"max_steps": 14, "checkpoint_every": 5, "eval_every": 5, "warmup_steps": 2, "sample_prompts": 1,
        "max_new_tokens": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory, engine_env):
    return engine_env(tmp_path_factory.mktemp("policies"))


def run(env, run_id, overrides, monkeypatch, fault=None):
    if fault:
        monkeypatch.setenv("DUET_FAULT", fault)
    else:
        monkeypatch.delenv("DUET_FAULT", raising=False)
    state, rec, _ = run_plan(env, run_id, {**BASE, **overrides}, timeout=600)
    return state, rec, env[1].status(run_id)["events"]


def test_oom_halves_the_micro_batch_keeps_the_effective_batch_and_finishes(env, monkeypatch):
    state, rec, events = run(env, "oom", {"micro_batch": 4, "grad_accum": 1}, monkeypatch, fault="oom@step=7")
    assert state == "finished", rec["error"]
    (r,) = rec["recoveries"]
    planned = rec["config"]["train"]  # the planner may have packed 4 rows into fewer
    assert planned["micro_batch"] >= 2
    assert r["kind"] == "oom" and r["step"] == 6
    assert r["change"] == {"micro_batch": planned["micro_batch"] // 2, "grad_accum": planned["grad_accum"] * 2}
    assert r["resumed_from"].endswith("checkpoint-5")
    eff = rec["train_effective"]
    assert eff["micro_batch"] * eff["grad_accum"] == rec["config"]["train"]["micro_batch"] * rec["config"]["train"]["grad_accum"]
    assert rec["steps"] == 14 and sorted(x["step"] for x in rec["losses"]) == list(range(1, 15))
    assert any(e["event"] == "oom" for e in events)
    assert REGISTRY.get_sample_value("duet_oom_events_total", {"run_id": "oom", "phase": "sft"}) == 1.0
    assert "oom" in rec["faults_fired"]


def test_a_real_allocation_past_a_memory_limit_is_recovered_by_the_oom_policy(env, monkeypatch):
    """Nothing raised by hand: from step 3 the process's address space is limited (RLIMIT_AS) to what it
    has mapped; the step's own tensors then fail in torch's CPU allocator (a RuntimeError, not
    torch.OutOfMemoryError), which the policy must take for an OOM and re-plan. The limit holds for
    that attempt; the re-planned one (half the micro-batch) runs without it."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    state, rec, events = run(env, "memcap", {"micro_batch": 4, "grad_accum": 1, "max_steps": 6, "checkpoint_every": 2,
                                             "eval_every": 6},
                             monkeypatch, fault="memcap@step=3")
    assert state == "finished", rec["error"]
    (capped,) = [e for e in events if e["event"] == "memory_capped"]
    assert capped["as"] == "RLIMIT_AS" and capped["limit_bytes"] == capped["mapped_bytes"]
    (r,) = rec["recoveries"]
    # whatever allocates first fails: torch's CPU allocator (a RuntimeError), a native library (OSError
    # ENOMEM: "Cannot allocate memory (os error 12)") or Python (MemoryError); each is an OOM to the policy
    assert r["kind"] == "oom" and r["error"] in ("RuntimeError", "OSError", "MemoryError"), r
    assert "allocate memory" in r["message"] or r["error"] == "MemoryError", r
    assert "DUET_FAULT" not in r["message"]
    planned = rec["config"]["train"]
    assert r["change"] == {"micro_batch": planned["micro_batch"] // 2, "grad_accum": planned["grad_accum"] * 2}
    # the first allocation after step 2 that needs a new mapping fails: in step 3, or in a later step or
    # checkpoint write when those reuse freed memory; the run goes on from the newest checkpoint before it
    resumed = int(r["resumed_from"].rsplit("-", 1)[1])
    assert 2 <= resumed <= r["step"] and r["step"] >= 2
    assert rec["steps"] == 6 and rec["train_effective"]["micro_batch"] == planned["micro_batch"] // 2
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # lifted: the process has its memory back


def test_nan_loss_rolls_back_with_a_lower_learning_rate(env, monkeypatch):
    state, rec, events = run(env, "nan", {}, monkeypatch, fault="nan@step=8")
    assert state == "finished", rec["error"]
    (r,) = rec["recoveries"]
    assert r["kind"] == "rollback" and "non-finite" in r["reason"] and r["lr_scale"] == 0.5
    assert r["resumed_from"].endswith("checkpoint-5")
    assert all(x["loss"] == x["loss"] for x in rec["losses"])  # no NaN survives in the record
    assert REGISTRY.get_sample_value("duet_rollbacks_total", {"run_id": "nan", "phase": "sft"}) == 1.0
    lrs = {x["step"]: x["learning_rate"] for x in rec["losses"]}
    assert any(e["event"] == "rollback" for e in events)
    assert lrs[8] > 0


def test_exploding_gradients_alert_then_roll_back(env, monkeypatch):
    state, rec, events = run(env, "explode", {"grad_norm_limit": 1e-6, "grad_norm_patience": 2, "max_recoveries": 1},
                             monkeypatch)
    assert state == "failed" and "giving up" in rec["error"]
    assert [r["kind"] for r in rec["recoveries"]] == ["rollback", "rollback"]
    assert any(e["event"] == "alert" and e["rule"] == "grad_norm_high" for e in events)


def test_qlora_trains_and_merges_on_cpu(env, monkeypatch):
    state, rec, _ = run(env, "qlora", {"method": "qlora", "max_steps": 6}, monkeypatch)
    assert state == "finished", rec["error"]
    assert rec["eval_loss_after"] < rec["eval_loss_before"]
    assert rec["merged_model"]["logit_max_abs_diff"] < 1e-3 and rec["merged_model"]["dtype"] == "float32"


def test_pause_checkpoints_and_waits_then_resume_finishes(env, monkeypatch):
    arch, ex, ds = env
    monkeypatch.delenv("DUET_FAULT", raising=False)
    plan = arch.design_plan("demo", ex.probe(), ex.prepare_model("tiny"), "tiny", ds, {**BASE, "max_steps": 200})
    ex.submit(arch.submission({**plan, "run_id": "pause"}, ds))
    deadline = time.time() + 120
    while ex.status("pause")["progress"]["step"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    ex.pause("pause")
    while ex.status("pause")["state"] != "paused" and time.time() < deadline:
        time.sleep(0.05)
    st = ex.status("pause")
    assert st["state"] == "paused"
    step = st["progress"]["step"]
    time.sleep(1.0)
    assert ex.status("pause")["progress"]["step"] == step  # it really waits
    assert (ex.data_dir / "runs/pause/checkpoints" / f"checkpoint-{step}" / "duet_checkpoint.json").exists()
    ex.resume("pause")
    ex.cancel("pause")
    assert ex.wait("pause", timeout=120) == "cancelled"


def test_thermal_pause_checkpoints_waits_until_cool_and_the_losses_are_unchanged(env, monkeypatch):
    """A (fake) GPU passes its temperature limit mid-run: the watchdog pauses the run at a checkpoint,
    waits until the card is back under 75 C, resumes; the per-step losses equal an uninterrupted run's."""
    from tests.fakes import FakeGpuSource

    arch, ex, ds = env
    cfg = {"max_steps": 16, "watchdog": {"interval_s": 0.05}}
    _, cool, _ = run(env, "cool", cfg, monkeypatch)
    seen = {"paused_at": None}

    def script(_n, _run):
        r = ex.runs.get("hot")
        if r is None:
            return {"temperature_c": 60.0}
        if r.state == "paused" and seen["paused_at"] is None:
            seen["paused_at"] = time.monotonic()
        if seen["paused_at"] is not None:
            return {"temperature_c": 91.0 if time.monotonic() - seen["paused_at"] < 1.5 else 70.0}
        return {"temperature_c": 91.0 if r.progress["step"] >= 5 else 60.0}

    ex.gpu_source = FakeGpuSource(script)
    try:
        state, hot, events = run(env, "hot", cfg, monkeypatch)
    finally:
        ex.gpu_source = None
    assert state == "finished", hot["error"]
    kinds = [e["event"] for e in events]
    alert = next(e for e in events if e["event"] == "alert")
    assert alert["rule"] == "gpu_temperature_high" and alert["threshold"] == 85.0  # min(85, 90 - 5)
    i_pause, i_resume = kinds.index("thermal_pause"), kinds.index("thermal_resume")
    paused = [e for e in events if e["event"] == "state" and e["state"] == "paused"]
    assert paused and i_pause < events.index(paused[0]) < i_resume
    ckpt = [e for e in events[i_pause:i_resume] if e["event"] == "checkpoint"]
    assert ckpt and ckpt[0]["valid"]  # it checkpointed before waiting
    assert {x["step"]: x["loss"] for x in hot["losses"]} == pytest.approx({x["step"]: x["loss"] for x in cool["losses"]}, abs=1e-6)
    assert REGISTRY.get_sample_value("duet_alerts_total", {"run_id": "hot", "phase": "sft", "rule": "gpu_temperature_high",
                                                           "severity": "critical"}) == 1.0
