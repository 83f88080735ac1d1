"""The run engine on a tiny model, without Ray: train, checkpoint, eval, merge, report."""

import json

import pytest


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, engine_env):
    arch, ex, ds = engine_env(tmp_path_factory.mktemp("engine"))
    plan = arch.design_plan("demo", ex.probe(), ex.prepare_model("tiny"), "tiny", ds,
                            {"max_steps": 12, "checkpoint_every": 5, "eval_every": 5})
    run_id = ex.submit(arch.submission(plan, ds))
    assert ex.wait(run_id, timeout=600) == "finished", ex.status(run_id)["error"]
    return arch, ex, run_id, ds


def test_run_trains_checkpoints_and_lowers_eval_loss(finished_run):
    arch, ex, run_id, ds = finished_run
    rec = json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    assert rec["status"] == "finished" and rec["steps"] == 12
    assert rec["eval_loss_after"] < rec["eval_loss_before"]
    assert [c["step"] for c in rec["checkpoints"]] == [5, 10, 12] and all(c["valid"] for c in rec["checkpoints"])
    assert len(rec["losses"]) == 12
    assert rec["dataset"]["content_hash"] == ds["content_hash"]
    mm = rec["merged_model"]  # in the plan's dtype: bf16 on a CPU with native bf16 (this one), fp32 otherwise
    assert mm["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[rec["config"]["dtype"]]
    if mm["dtype"] == "float32":
        assert mm["logit_max_abs_diff"] < 1e-3
    else:
        from training.run.merge_check import KL_BOUND
        assert mm["verification"]["kl_mean"] <= KL_BOUND["bf16"] and mm["criterion"].startswith("bf16")
    assert (ex.data_dir / "runs" / run_id / "merged" / "model.safetensors").is_file()
    assert len(rec["samples"]) == 3
    assert rec["peak_memory"]["rss_peak_bytes"] > 0


def test_run_record_lands_in_the_workspace(finished_run):
    arch, ex, run_id, ds = finished_run
    out = arch.record_run(ex.fetch_record(run_id))
    run_dir = arch.ws.root / "runs" / run_id
    assert {p.name for p in run_dir.iterdir()} >= {"run.json", "report.md", "loss.png", "events.jsonl"}
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval loss" in (run_dir / "report.md").read_text()
    assert arch.ws.log_subjects()[-1].startswith(f"run: {run_id} finished")
    assert f"run/{run_id}" in [t.name for t in arch.ws.repo.tags]
    assert out["commit"]


def test_preflight_refuses_a_tampered_dataset(finished_run):
    arch, ex, run_id, ds = finished_run
    plan = json.loads((ex.data_dir / "runs" / run_id / "run.json").read_text())["config"]
    spec = arch.submission({**plan, "run_id": "tampered"}, ds)
    spec["dataset"]["files"]["train.jsonl"] += '{"id": "x"}\n'
    ex.submit(spec)
    assert ex.wait("tampered", timeout=120) == "failed"
    st = ex.status("tampered")
    assert "does not match" in st["error"]
    assert not (ex.data_dir / "runs" / "tampered" / "checkpoints").exists()
