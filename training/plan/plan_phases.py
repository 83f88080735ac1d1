"""The planner's estimate of every phase of a run, not only training.

A run's memory peaks in one of: training (plan.estimate), the evaluations before and after it (a
no-grad forward at the eval batch, the optimizer state still held), the merge (the base loaded
again in the merge dtype, the adapter, the merged weights written over it, the probe's full
logits) or sampling (the merged model generating). On a GPU the engine frees the training model
before the merge and merges on the GPU when it fits, else in host RAM; a phase that fits neither
makes the plan not fit, before any training starts.

Bytes are in the accounting of each measurement: ``total_bytes`` (what the process holds: CPU RSS,
or on a GPU torch's reservation plus the CUDA context) and ``reserved_bytes`` (what
torch.cuda.max_memory_reserved() sees). run.json's ``phases`` puts each next to its measured peak.
"""

from __future__ import annotations

from training.config import TrainConfig
from training.plan.memory_model import CUDA_CONTEXT_BYTES, DTYPE_BYTES, MIB, NF4_DQ_BYTES, RUNTIME_CPU, ModelProfile, \
    loss_head_bytes, scaled_total, train_dtype

MERGE_EXTRA = 64 * MIB  # the merge's own temporaries beyond the weights (measured: demo)
PROBE_TOKENS = 256      # the merge check's probe prompts (2 of the test split), at most this long each


def _finish(sub: int, device: str) -> dict:
    if device == "cuda":
        reserved = int(256 * MIB + 1.08 * sub)
        return {"reserved_bytes": reserved, "total_bytes": reserved + CUDA_CONTEXT_BYTES}
    return {"reserved_bytes": int(sub), "total_bytes": int(sub + RUNTIME_CPU)}


def calibrated(est: dict, factor: float, device: str) -> dict:
    """A phase's estimate scaled by its own measured ratio (measured peak / this formula's estimate, in the
    measurement's accounting: torch's reservation on a GPU, RSS on a CPU)."""
    if factor == 1.0:
        return {**est, "factor": 1.0}
    if device == "cuda":
        reserved = int(est["reserved_bytes"] * factor)
        return {"reserved_bytes": reserved, "total_bytes": reserved + CUDA_CONTEXT_BYTES, "factor": factor}
    return {"reserved_bytes": int(est["reserved_bytes"] * factor), "total_bytes": int(est["total_bytes"] * factor),
            "factor": factor}


def phase_estimates(cfg: TrainConfig, model: ModelProfile, device: str, bf16: bool, breakdown: dict[str, int],
                    factor: float = 1.0, host_ram_bytes: int | None = None, budget_bytes: int | None = None,
                    phase_factors: dict | None = None) -> dict:
    """{phase: {"total_bytes", "reserved_bytes", "where", "factor"}} for training, evaluation, merge, sampling.
    ``factor`` calibrates training; ``phase_factors`` each later phase by its own measurements (a phase's
    peak has its own error: training's factor scaled evaluation 20 % under before, issue 37)."""
    pf = {k: float(v) for k, v in (phase_factors or {}).items() if isinstance(v, (int, float)) and v > 0}
    dt = train_dtype(cfg, device, bf16)
    wb = DTYPE_BYTES[dt]
    training_total = scaled_total(breakdown, factor)
    ctx = breakdown.get("cuda_context", 0)
    out = {"training": {"total_bytes": training_total, "reserved_bytes": training_total - ctx, "where": device,
                        "factor": factor}}

    # evaluation: the training state stays; a no-grad forward holds one layer's activations at a time
    eval_rows = cfg.eval_batch or cfg.micro_batch
    tokens = eval_rows * cfg.seq_len * (2 if cfg.phase == "dpo" else 1)
    h, i = model.hidden, model.intermediate
    layer = tokens * (4 * h + 2 * i) * wb
    if device != "cuda":
        layer += eval_rows * model.heads * cfg.seq_len ** 2 * wb
    ev = breakdown["weights"] + breakdown["trainable_and_optimizer"] + layer + \
        loss_head_bytes(tokens, model.vocab, h, wb, device, backward=False)
    out["evaluation"] = {**calibrated(_finish(ev, device), pf.get("evaluation", 1.0), device), "where": device}

    # merge: the training model is freed; the base comes back in the merge dtype (fp32 plans merge in
    # fp32, 16-bit plans in their dtype; QLoRA first runs the nf4 model once for its drift)
    merge_w = model.params * (4 if dt == "fp32" else 2)  # merge_and_unload writes into the base in place
    adapter = 0 if cfg.method == "full" else model.lora_params(cfg.lora) * 4
    probe = 3 * min(PROBE_TOKENS, cfg.seq_len) * model.vocab * 4  # reference, base and merged logits, fp32
    # on CPU a 16-bit merge reads a checkpoint that may be stored wider (SmolLM2's is fp32, dequantized from
    # its GGUF): the read stays resident beside the cast copy (measured: demo, bf16 merge and sampling peaks
    # ~params x 4 above the cast weights alone); counted whatever the checkpoint's width, to stay on the safe side
    read = model.params * 4 if device != "cuda" and dt != "fp32" else 0
    merge = merge_w + read + adapter + probe + MERGE_EXTRA
    if cfg.method == "qlora":
        emb = model.embedding_params + model.hidden
        merge = max(merge, (model.params - emb) * NF4_DQ_BYTES + emb * 4 + adapter + probe)
    where = device
    est = calibrated(_finish(merge, device), pf.get("merge", 1.0), device)
    if device == "cuda" and budget_bytes is not None and est["total_bytes"] > budget_bytes * 0.9:
        where = "cpu"  # the engine merges in host RAM when the GPU has no room (engine.merge_and_evaluate)
        est = calibrated(_finish(merge, "cpu"), 1.0, "cpu")  # a GPU merge's ratio says nothing of a CPU one
        if host_ram_bytes is not None and est["total_bytes"] > host_ram_bytes:
            where = "nowhere"
    out["merge"] = {**est, "where": where}

    # sampling: the merged model generating a few short answers (its KV cache is small)
    samp = merge_w + read + adapter + MERGE_EXTRA + 2 * 2 * PROBE_TOKENS * model.layers * h * wb + 4 * model.vocab * 4
    sdev = out["merge"]["where"] if out["merge"]["where"] != "nowhere" else device
    out["sampling"] = {**calibrated(_finish(samp, sdev), pf.get("sampling", 1.0) if sdev == device else 1.0, sdev),
                       "where": out["merge"]["where"]}
    return out


def phase_ratios(rec: dict) -> dict[str, float]:
    """Each later phase's measured peak over its formula's estimate (without the calibration the plan
    applied), from a run record (run.json ``phases`` beside ``config.estimate.phases``): what calibrates
    that phase in the next plan on this host. Plans before per-phase calibration scaled evaluation by
    training's factor; that is divided out."""
    measured = rec.get("phases") or {}
    est = ((rec.get("config") or {}).get("estimate") or {})
    planned = est.get("phases") or {}
    train_factor = ((est.get("calibration") or {}).get("factor")) or 1.0
    out = {}
    for name in ("evaluation", "merge", "sampling"):
        m, p = measured.get(name) or {}, planned.get(name) or {}
        if not m.get("measured_bytes") or not m.get("estimate_bytes"):
            continue
        applied = p.get("factor", train_factor if name == "evaluation" else 1.0) or 1.0
        formula = m["estimate_bytes"] / applied
        if formula > 0:
            out[name] = round(m["measured_bytes"] / formula, 4)
    return out
