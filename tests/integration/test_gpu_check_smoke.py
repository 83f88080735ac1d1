"""The GPU check a lent H100/H200 runs (benchmarks/gpu_check.py), run here on tiny shapes (``--smoke``),
so a later change cannot break the script before a GPU ever runs it (issue 36)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_gpu_check_runs_every_case_on_this_cpu(tmp_path, repo_root):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DUET_FAULT", None)
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--out", str(out)],
                       capture_output=True, text=True, cwd=repo_root, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    doc = json.loads((out / "gpu_check.json").read_text())
    runs = {x["run_id"]: x for x in doc["runs"]}
    assert set(runs) == {"lora-sft", "qlora-sft", "lora-dpo", "qlora-dpo", "lora-sft-packed", "oom-recovery", "full-sft"}
    assert all(x["state"] == "finished" for x in runs.values()), {k: x.get("error") for k, x in runs.items()}
    # what trained is what was planned: fp32 adapters (QLoRA's too, after TRL's bf16 cast) and master weights
    assert all(x["trainable_dtypes"] == ["float32"] for x in runs.values()), {k: x["trainable_dtypes"] for k, x in runs.items()}
    assert runs["lora-sft-packed"]["packing"] is True
    (oom,) = runs["oom-recovery"]["recoveries"]
    assert oom["kind"] == "oom" and "DUET_FAULT" not in oom["message"] and runs["oom-recovery"]["memory_capped"]
    for x in runs.values():  # every phase measured beside its estimate
        assert x["phases"]["training"]["measured_bytes"] > 0 and x["phases"]["training"]["estimate_bytes"] > 0
    assert doc["exporter"]["parsed"] and "duet_gpu_process_memory_bytes" in doc["exporter"]["nvml_present"]
    plain = doc["plain_trl_lora_sft"]
    assert plain["error"] is None and plain["tokens_per_s"] > 0 and doc["tokens_per_s_ratio_duet_to_plain_trl"] > 0
    assert doc["plain_trl_liger_lora_sft"]["error"]  # no liger-kernel on this CPU: said, not crashed


def test_the_planner_benchmark_measures_one_config_the_way_the_gpu_check_runs_it(repo_root):
    """benchmarks/vram_planner.py runs each config in a child (``--one``), as gpu_check.sh runs it on a
    GPU: here a QLoRA DPO config of the tiny shape against the process's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(repo_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.vram_planner", "--device", "cpu", "--one",
                        "tiny,qlora,2,256,0,dpo"], capture_output=True, text=True, cwd=repo_root, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["method"] == "qlora" and row["kind"] == "dpo" and not row["oom"]
    assert row["measured_bytes"] > 0 and row["estimate_bytes"] > 0 and row["ratio_estimate_to_measured"] > 0
