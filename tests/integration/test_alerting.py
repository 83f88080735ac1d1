"""The shipped Prometheus/Alertmanager configs, checked by promtool/amtool, and the whole path run for
real: a tiny training run's exporter -> Prometheus (scrape + rules) -> Alertmanager -> duet's
webhook receiver, plus `promtool check metrics` on a scrape taken during the run."""

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from infra import monitoring

pytestmark = pytest.mark.integration
CONFIGS = Path(monitoring.CONFIGS)
BIN = monitoring.binaries()
needs = pytest.mark.skipif(not (BIN["prometheus"] and BIN["alertmanager"] and BIN["promtool"] and BIN["amtool"]),
                           reason="Prometheus/Alertmanager binaries not installed (.ci/run installs Debian's)")


@needs
@pytest.mark.parametrize("cmd", [["promtool", "check", "config", "prometheus.yml"],
                                 ["promtool", "check", "rules", "rules.yml"],
                                 ["promtool", "test", "rules", "rules_test.yml"],
                                 ["amtool", "check-config", "alertmanager.yml"]])
def test_shipped_configs_pass_the_official_checks(cmd):
    r = subprocess.run(cmd, cwd=CONFIGS, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_grafana_dashboard_plots_what_the_issue_lists():
    dash = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for metric in ("duet_train_loss", "duet_train_learning_rate", "duet_train_grad_norm", "duet_train_tokens_per_second",
                   "duet:gpu_memory_used:ratio", "duet_gpu_temperature_celsius", "duet_gpu_throttle_reason",
                   "duet_alerts_total"):
        assert metric in exprs, metric


@needs
def test_alert_travels_from_a_training_run_to_the_webhook(tmp_path, engine_env):
    arch, ex, ds = engine_env(tmp_path)
    from training.run import telemetry

    port = telemetry.serve(0)  # the process's exporter (one per process)
    ws = tmp_path / "ws"
    ports = {"prometheus": 9590, "alertmanager": 9593, "receiver": 9597}
    up = monitoring.up(ws, exporter=f"127.0.0.1:{port}", ports=ports)
    run_id = None
    try:
        assert set(up["services"]) == {"prometheus", "alertmanager", "receiver"}
        # an absurd watchdog limit: the gradient norm is "too high" from the first steps (the engine's
        # own rollback limit stays at 10, so the run goes on)
        plan = arch.design_plan("demo", ex.probe(), ex.prepare_model("tiny"), "tiny", ds,
                                {"max_steps": 400, "checkpoint_every": 200, "eval_every": 400, "sample_prompts": 1,
                                 "max_new_tokens": 4, "watchdog": {"grad_norm_high": 1e-6, "grad_norm_patience": 2}})
        run_id = ex.submit(arch.submission(plan, ds))
        t_fired = None
        deadline = time.time() + 120
        received = ws / ".duet" / "infra" / "alerts.jsonl"
        checked = False
        while time.time() < deadline:
            snap = ex.status(run_id)
            if not checked and snap["state"] == "training" and snap["progress"]["step"] >= 3:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
                r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
                assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
                assert b'duet_train_step{phase="sft",run_id="' + run_id.encode() in text
                assert b"duet_gpu_" not in text  # no GPU here: GPU metrics are absent, not zero
                checked = True
            if t_fired is None:
                t_fired = next((e["time"] for e in snap["events"] if e["event"] == "alert"), None)
            if received.exists():
                got = [json.loads(x) for x in received.read_text().splitlines()]
                hits = [g for g in got if g["source"] == "alertmanager" and g["alert"]["labels"].get("alertname") ==
                        "DuetWatchdogAlert" and g["alert"]["labels"].get("rule") == "grad_norm_high"]
                if hits:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no alert reached the webhook; status: {monitoring.status(ws)}")
        assert checked and t_fired is not None
        a = hits[0]["alert"]
        assert a["status"] == "firing" and a["labels"]["run_id"] == run_id and a["labels"]["severity"] == "critical"
        st = monitoring.status(ws)
        assert st["targets"] and st["targets"][0]["health"] == "up"
        print(f"watchdog alert -> webhook: {hits[0]['received'] - t_fired:.2f} s")
    finally:
        if run_id:
            ex.cancel(run_id)
            ex.wait(run_id, timeout=60)
        stopped = monitoring.down(ws)
        assert set(stopped) == {"prometheus", "alertmanager", "receiver"}
