"""Interruptions cost at most one checkpoint interval, and a resumed run is the same run.

Each run trains the tiny model in a separate `duet train` process; `DUET_FAULT=kill@step=12` makes
that process SIGKILL itself right after step 12 (checkpoints every 5), the way a crash would.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from roles.architect import Architect
from training.plan.hardware import probe
from training.models import model_config

pytestmark = pytest.mark.integration
DUET = [sys.executable, "-m", "cluster.cli"]
STEPS = {"max_steps": 20, "checkpoint_every": 5, "eval_every": 5, "keep_checkpoints": 3, "warmup_steps": 3,
         "sample_prompts": 1, "max_new_tokens": 8}


def train(config, run_id, *extra, fault=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("DUET_FAULT", None)
    if fault:
        env["DUET_FAULT"] = fault
    return subprocess.run(DUET + ["train", str(config), "--run-id", run_id, "--json", *extra], capture_output=True,
                          text=True, timeout=600, env=env)


def losses(ws, run_id):
    return {x["step"]: x["loss"] for x in json.loads((ws / ".duet/executor/runs" / run_id / "run.json").read_text())["losses"]}


def _plan(tmp_path_factory, files, name, overrides):
    ws = tmp_path_factory.mktemp(name) / "ws"
    arch = Architect(str(ws), None, None, session_title=name)
    ds = arch.curate([str(f) for f in files], name)
    plan = arch.design_plan("demo", probe(ws).to_dict(), model_config("tiny"), "tiny", ds, {**STEPS, **overrides})
    return ws, ws / "configs" / f"{plan['run_id']}.yaml"


@pytest.fixture(scope="module")
def sft(tmp_path_factory, repo_root):
    ws, cfg = _plan(tmp_path_factory, [repo_root / "examples/persona/persona.jsonl"], "sft", {})
    r = train(cfg, "base")
    assert r.returncode == 0, r.stderr[-3000:]
    return ws, cfg, losses(ws, "base")


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, repo_root):
    recs = [json.loads(x) for x in (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()]
    pairs = []
    for i, r in enumerate(recs):
        other = recs[(i + 7) % len(recs)]["messages"][-1]["content"]
        pairs.append({"id": f"pair-{i}", "prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
                      "rejected": [{"role": "assistant", "content": other}],
                      "metadata": r["metadata"]})
    f = tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ws, cfg = _plan(tmp_path_factory, [f], "dpo", {"phase": "dpo", "micro_batch": 2})
    r = train(cfg, "base")
    assert r.returncode == 0, r.stderr[-3000:]
    return ws, cfg, losses(ws, "base")


def _kill_and_resume(ws, cfg, base, run_id, after=None):
    killed = train(cfg, run_id, fault="kill@step=12")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    logged = [json.loads(x)["step"] for x in (ws / ".duet/executor/runs" / run_id / "losses.jsonl").read_text().splitlines()]
    assert max(logged) == 12  # it got to step 12, then died
    if after:
        after(ws / ".duet/executor/runs" / run_id / "checkpoints")
    resumed = train(cfg, run_id, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses(ws, run_id)
    assert sorted(got) == list(range(1, 21))
    return got


def test_sft_resume_after_sigkill_matches_the_uninterrupted_run(sft):
    ws, cfg, base = sft
    assert sorted(base) == list(range(1, 21))
    got = _kill_and_resume(ws, cfg, base, "killed")
    for step in range(11, 21):
        assert abs(got[step] - base[step]) <= 1e-6, (step, got[step], base[step])
    rec = json.loads((ws / ".duet/executor/runs/killed/run.json").read_text())
    assert rec["status"] == "finished" and rec["eval_loss_after"] < rec["eval_loss_before"]
    events = [json.loads(x) for x in (ws / ".duet/executor/runs/killed/events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resume" and e["checkpoint"].endswith("checkpoint-10") for e in events)


def test_truncated_checkpoint_is_skipped_and_the_previous_one_used(sft):
    ws, cfg, base = sft

    def truncate(root):
        f = root / "checkpoint-10" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    got = _kill_and_resume(ws, cfg, base, "truncated", after=truncate)
    for step in range(6, 21):
        assert abs(got[step] - base[step]) <= 1e-6, step
    events = [json.loads(x) for x in (ws / ".duet/executor/runs/truncated/events.jsonl").read_text().splitlines()]
    skipped = [e for e in events if e["event"] == "checkpoint_skipped"]
    assert skipped and skipped[0]["paths"][0].endswith("checkpoint-10")
    assert any(e["event"] == "resume" and e["checkpoint"].endswith("checkpoint-5") for e in events)


def test_dpo_resume_after_sigkill_matches_the_uninterrupted_run(dpo):
    ws, cfg, base = dpo
    got = _kill_and_resume(ws, cfg, base, "killed")
    for step in range(11, 21):
        assert abs(got[step] - base[step]) <= 1e-6, (step, got[step], base[step])
