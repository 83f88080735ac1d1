"""The GPU path's dtype rules, exercised on this CPU (which runs bf16): a bf16 run's merge is
verified by a dtype-aware criterion, QLoRA reports its drift from the nf4 model it trained, a full
fine-tune runs end to end (issue 15)."""

import pytest

from tests.runs import run_plan

pytestmark = pytest.mark.integration
SHORT = {"max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "warmup_steps": 1, "sample_prompts": 1,
         "max_new_tokens": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory, engine_env):
    return engine_env(tmp_path_factory.mktemp("gpu-path"))


def run(env, run_id, model, overrides):
    return run_plan(env, run_id, {**SHORT, **overrides}, model)


@pytest.mark.skipif(not __import__("training.plan.hardware", fromlist=["cpu_bf16"]).cpu_bf16()["native"],
                    reason="this CPU emulates bf16 (no AVX512-BF16/AMX): a bf16 plan is refused here (issue 37)")
def test_bf16_sft_of_smollm2_finishes_with_a_verified_merge(env):
    state, rec, d = run(env, "bf16-smollm2", "smollm2", {"dtype": "bf16", "micro_batch": 2})
    assert state == "finished", rec["error"]
    m = rec["merged_model"]
    assert rec["config"]["dtype"] == "bf16" and m["dtype"] == "bfloat16"
    v = m["verification"]
    from training.run.merge_check import TOP1_FLIPS_ALLOWED

    assert v["positions"] > 0 and v["kl_mean"] <= 2e-2
    assert v["top1_agreement_decided"] >= 0.98 or v["flips_decided"] <= TOP1_FLIPS_ALLOWED["bf16"], v
    assert m["criterion"].startswith("bf16: mean KL") and "not judged in bf16" in m["criterion"]
    assert (d / "merged" / "model.safetensors").is_file()
    assert "KL" in (d / "report.md").read_text()
    ph = rec["phases"]  # every phase measured, and set beside the planner's estimate of it
    assert {"training", "evaluation", "merge", "sampling"} <= set(ph)
    assert all(ph[k]["measured_bytes"] > 0 and ph[k]["estimate_bytes"] > 0 for k in ("training", "merge"))


def test_qlora_reports_its_drift_from_the_nf4_model_it_trained(env):
    state, rec, d = run(env, "qlora-drift", "tiny", {"method": "qlora"})
    assert state == "finished", rec["error"]
    assert rec["trainable_dtypes"] == ["float32"]  # what trained is what the plan counted
    drift = rec["merged_model"]["qlora_drift"]
    # measured, not judged; on the tiny model the 16-bit merge stays close to what was trained
    assert drift["positions"] > 0 and drift["kl_mean"] < 0.05 and drift["top1_agreement"] >= 0.9
    assert "nf4" in drift["note"] and "drift" in (d / "report.md").read_text()


def test_full_fine_tune_runs_end_to_end(env):
    state, rec, d = run(env, "full", "tiny", {"method": "full", "learning_rate": 1e-4})
    assert state == "finished", rec["error"]
    assert rec["eval_loss_after"] < rec["eval_loss_before"]
    assert (d / "merged" / "model.safetensors").is_file() and not (d / "adapter").exists()
    assert "no merge" in rec["merged_model"]["verified"] and len(rec["samples"]) == 1
    assert rec["train_peak_formula_bytes"] > 0


@pytest.mark.parametrize("phase", ["sft", "dpo"])
def test_qlora_adapters_train_in_the_planned_fp32_after_trl_builds_its_trainer(phase, tmp_path):
    """TRL 1.16 casts a 4-bit model's trainable parameters to bf16 when it builds SFT and DPO trainers;
    the plan (and its memory model: 16 bytes an adapter parameter) is fp32, so duet casts back."""
    from datasets import Dataset

    from training import models
    from training.config import load_config
    from training.run.model_load import build_trainer, load_tokenizer, load_train_model, trainable_dtypes

    folder = models.resolve("tiny")
    cfg = load_config("demo", {"method": "qlora", "phase": phase, "max_steps": 4})
    model = load_train_model(folder, cfg, device="cpu", dtype="fp32")
    tok = load_tokenizer(folder)
    user, yes, no = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "yes"}], \
        [{"role": "assistant", "content": "no"}]
    rows = [{"messages": user + yes}] * 4 if phase == "sft" else [{"prompt": user, "chosen": yes, "rejected": no}] * 4
    ds = Dataset.from_list(rows)
    trainer = build_trainer(model, tok, cfg, phase=phase, device="cpu", dtype="fp32", out=tmp_path, max_steps=4,
                            evaluate=False, save=False, train_ds=ds, eval_ds=ds)
    assert trainable_dtypes(trainer.model) == ["float32"]
    assert any("lora_A" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
