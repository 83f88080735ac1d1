"""Every watchdog rule against recorded metric sequences (a fake GPU source, a manual clock)."""

import http.server
import json
import threading

import pytest

from tests.fakes import FakeGpuSource, Recorded
from training.config import Thresholds
from training.run.watchdog import Watchdog


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def dog(readings=None, **kw):
    fired, actions = [], []
    clock = Clock()
    src = FakeGpuSource(Recorded(readings)) if readings else None
    w = Watchdog("r1", "sft", Thresholds(**kw), gpu_source=src, on_alert=fired.append, clock=clock,
                 pause=lambda why: actions.append(("pause", why)) or True,
                 resume=lambda why: actions.append(("resume", why)) or True)
    w.training = True
    return w, fired, actions, clock


def rules(fired):
    return [a["rule"] for a in fired]


def test_vram_above_90_percent_fires_once_and_rearms():
    gib = 2**30
    seq = [{"process_memory_bytes": u * gib, "memory_used_bytes": u * gib} for u in (10, 21.5, 22, 23, 12, 22)]  # of 24 GiB
    w, fired, _, _ = dog(seq)
    for _ in seq:
        w.tick()
    assert rules(fired) == ["gpu_memory_high", "gpu_memory_high"]  # 21.5/24 = 0.896 does not; re-armed at 12
    assert fired[0]["severity"] == "warning" and fired[0]["value"] == pytest.approx(22 / 24, abs=1e-3)


def test_vram_alert_counts_only_duets_memory_on_a_shared_card():
    """Another process holds most of the card: a run within its plan never alarms; the card's use is
    named as context when duet's own memory does cross the line."""
    gib = 2**30
    seq = [{"process_memory_bytes": 8 * gib, "memory_used_bytes": 23 * gib},    # 96 % of the card, a third duet's
           {"process_memory_bytes": 12 * gib, "memory_used_bytes": 23.5 * gib},
           {"process_memory_bytes": 22 * gib, "memory_used_bytes": 23.8 * gib}]
    w, fired, _, _ = dog(seq)
    for _ in seq[:2]:
        w.tick()
    assert fired == []
    w.tick()
    assert rules(fired) == ["gpu_memory_high"] and fired[0]["value"] == pytest.approx(22 / 24, abs=1e-3)
    assert "duet's training holds 92%" in fired[0]["message"] and "the card: 99% used" in fired[0]["message"]


def test_no_process_reading_means_no_vram_alert():
    w, fired, _, _ = dog([{"process_memory_bytes": None, "memory_used_bytes": 24 * 2**30}])
    w.tick()
    assert fired == []


def test_process_memory_from_nvml_for_duets_pids_else_torch_reserved():
    from types import SimpleNamespace as P

    from training.run.watchdog import process_memory

    procs = [P(pid=10, usedGpuMemory=5 * 2**30), P(pid=11, usedGpuMemory=2**30), P(pid=99, usedGpuMemory=9 * 2**30),
             P(pid=12, usedGpuMemory=None)]
    assert process_memory(procs, {10, 11, 12}) == (6 * 2**30, "nvml")
    # in a container NVML lists host pids (none of ours): torch's reserved memory of this process
    assert process_memory(procs, {1234}, lambda: 3 * 2**30) == (3 * 2**30, "torch_reserved")
    assert process_memory([], {1234}, lambda: None) == (None, None)


def test_a_followed_runs_ranks_count_as_duets_processes():
    import os

    from training.run.watchdog import track_pids, training_pids

    track_pids("run-a", {41, 42})
    try:
        assert training_pids() == {os.getpid(), 41, 42}
    finally:
        track_pids("run-a", None)
    assert training_pids() == {os.getpid()}


def test_temperature_uses_the_cards_slowdown_threshold_and_pauses_until_cool():
    seq = [{"temperature_c": t, "slowdown_c": 87.0} for t in (70, 80, 83, 84, 80, 76, 74, 70)]
    w, fired, actions, _ = dog(seq)
    for _ in seq:
        w.tick()
    # limit = min(85, 87 - 5) = 82: 83 fires and pauses; resumes under 75 C, not at 80 or 76
    assert rules(fired) == ["gpu_temperature_high"] and fired[0]["threshold"] == 82.0
    assert [a[0] for a in actions] == ["pause", "resume"]
    assert "83 C" in actions[0][1] and "74 C" in actions[1][1]


def test_no_gpu_source_means_no_gpu_rules():
    w, fired, actions, _ = dog(None)
    for _ in range(3):
        w.tick()
    assert fired == [] and actions == [] and w.last_gpu is None


def test_throughput_drop_against_the_runs_own_baseline():
    w, fired, _, _ = dog(None, throughput_warmup=2, throughput_baseline=4, throughput_patience=2)
    seq = [50, 80, 100, 102, 98, 100, 90, 79, 100, 70, 60, 55]  # warm-up 2, baseline median 100
    for step, tps in enumerate(seq, 1):
        w.observe_step(step, tps)
    # 90 ok (>= 80); 79 once is not enough; 70, 60 -> fires at the second low step (step 11)
    assert rules(fired) == ["throughput_drop"] and fired[0]["step"] == 11


def test_gradient_norm_high_and_vanishing_need_several_steps():
    w, fired, _, _ = dog(None, grad_norm_patience=3)
    for step, gn in enumerate([1.0, 12, 15, 2.0, 11, 12, 13, 14, 0.005, 0.004, 0.5, 0.003, 0.002, 0.001], 1):
        w.observe_log(step, 1.0, gn)
    assert rules(fired) == ["grad_norm_high", "grad_norm_vanishing"]
    assert fired[0]["step"] == 7 and fired[1]["step"] == 14


def test_nan_loss_is_critical():
    w, fired, _, _ = dog(None)
    w.observe_log(1, 2.0, 1.0)
    w.observe_log(2, float("nan"), 1.0)
    assert rules(fired) == ["loss_nan"] and fired[0]["severity"] == "critical"


def test_a_step_running_for_the_stall_time_fires_and_the_next_step_rearms_it():
    w, fired, _, clock = dog(None, stall_seconds=30)
    w.step_started()
    clock.t += 29
    w.tick()
    assert fired == []
    clock.t += 2
    w.tick()
    assert rules(fired) == ["training_stalled"] and "has run for 31 s" in fired[0]["message"]
    w.observe_step(1, None)
    w.step_started()
    clock.t += 31
    w.tick()
    assert rules(fired) == ["training_stalled", "training_stalled"]  # re-armed by the step


def test_load_eval_checkpoint_and_merge_are_not_stalls():
    """The clock runs only inside a step: before the first step (model load, quantization, the
    first evaluation) and between steps (evaluation, checkpoints) nothing fires, however long."""
    w, fired, _, clock = dog(None, stall_seconds=30)
    clock.t += 3600  # an 8B load + quantization + eval_loss_before
    w.tick()
    w.step_started()
    clock.t += 5
    w.observe_step(1, None)
    clock.t += 3600  # evaluation and a checkpoint after step 1
    w.tick()
    assert fired == []


def test_nvml_index_is_the_gpu_the_run_uses():
    from training.run.watchdog import nvml_index

    uuids = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]
    assert nvml_index(None, uuids) == 0
    assert nvml_index("2", uuids) == 2
    assert nvml_index("1,2", uuids) == 1
    assert nvml_index("GPU-cccc3333", uuids) == 2            # a UUID prefix, as CUDA accepts
    assert nvml_index("0", uuids, torch_uuid="bbbb2222-0000") == 1  # torch's own UUID wins (device order)
    assert nvml_index("7", uuids) == 0 and nvml_index("MIG-xyz", uuids) == 0


def test_the_vram_alert_sits_above_what_a_plan_may_use():
    from training.config import USABLE_FRACTION

    assert Thresholds().vram_fraction > USABLE_FRACTION


def test_unknown_watchdog_settings_are_refused():
    with pytest.raises(ValueError, match="unknown field"):
        Thresholds.from_train({"watchdog": {"vram": 0.5}})
    t = Thresholds.from_train({"grad_norm_limit": 5.0, "watchdog": {"temperature_c": 80}})
    assert t.grad_norm_high == 5.0 and t.temperature_c == 80


def test_alerts_are_posted_to_the_webhook():
    got = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        w, fired, _, _ = dog(None, webhook_url=f"http://127.0.0.1:{srv.server_address[1]}/hook")
        w.observe_log(3, float("inf"), None)
        for _ in range(50):
            if got:
                break
            threading.Event().wait(0.05)
        assert got and got[0]["alerts"][0]["rule"] == "loss_nan" and got[0]["source"] == "duet-watchdog"
    finally:
        srv.shutdown()
