"""Training plans: a preset + the executor's hardware + the model's config -> a validated plan with
a memory estimate broken down by component (training/plan/memory_model.py), each phase's estimate
(training/plan/plan_phases.py), the decisions taken and their measured basis, and a verdict.

``gradient_checkpointing: auto`` (the default) turns it on only when the plan does not fit
without it: checkpointing costs ~30 % throughput.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from training.config import USABLE_FRACTION, PlanError, TrainConfig
from training.plan.memory_model import FUSED_TOKEN_TILE, FUSED_VOCAB_TILE, GIB, ModelProfile, \
    cpu_loss_chunk_tokens, duet_cpu_lora, estimate, padding_free_refusal, qlora_head_saving, scaled_total, train_dtype


def check_emulated_dtype(cfg: TrainConfig, device: str, bf16: bool, speedup: float | None) -> None:
    """An explicit 16-bit dtype on a CPU that emulates it is refused (unless ``cpu.allow_emulated_dtype``):
    it trains many times slower than fp32, and nothing else would say so. bf16 is native with
    AVX512-BF16/AMX (``bf16``); fp16 has no fast CPU path in torch."""
    if device == "cuda" or cfg.dtype not in ("bf16", "fp16") or cfg.cpu.allow_emulated_dtype:
        return
    if cfg.dtype == "bf16" and bf16:
        return
    if cfg.dtype == "bf16":
        why = "this CPU has no native bf16 (no AVX512-BF16 or AMX): torch emulates it"
        if speedup is not None:
            why += f"; a bf16 matmul measured {speedup:g}x the speed of fp32 here"
    else:
        why = "torch has no fast fp16 path on a CPU (fp16 is a GPU dtype)"
    raise PlanError(f"field 'train.dtype': {cfg.dtype!r} on this CPU would train many times slower than fp32 ({why}). "
                    "Use dtype: auto (fp32 here), or set train.cpu.allow_emulated_dtype: true to train in it anyway.")


def dtype_decision(cfg: TrainConfig, device: str, bf16: bool) -> str:
    dt = train_dtype(cfg, device, bf16)
    if cfg.dtype != "auto":
        extra = " (this GPU has no native bf16: it will be emulated, slowly)" if dt == "bf16" and device == "cuda" \
            and not bf16 else ""
        return f"dtype {dt}: set in the config{extra}"
    if device == "cuda":
        return ("dtype bf16: the GPU has native bf16 (compute capability 8.0 or newer)" if bf16 else
                "dtype fp16 with a loss scaler: the GPU has no native bf16 (compute capability below 8.0; "
                "torch.cuda.is_bf16_supported() would count emulation)")
    if dt == "bf16":
        return ("dtype bf16 on CPU: it has native bf16 (AVX512-BF16/AMX, probed); the frozen base is stored in bf16 and "
                "the LoRA parameters and optimizer state stay fp32 under bf16 autocast" if cfg.method != "full" else
                "dtype bf16 on CPU: native bf16 (AVX512-BF16/AMX, probed); fp32 master weights under bf16 autocast")
    if bf16:
        return "dtype fp32 on CPU: QLoRA's 4-bit CPU kernels are not used in bf16 (bitsandbytes 0.50's AVX512-BF16 defect)"
    return "dtype fp32 on CPU: no native bf16 (no AVX512-BF16/AMX, or a probe found bf16 no faster)"


def speed_decisions(cfg: TrainConfig, device: str, vocab: int, dtype: str = "fp32",
                    softcap: float | None = None) -> list[str]:
    """The plan's speed and precision decisions that are not the dtype or packing, each with its measured basis."""
    out = []
    if device != "cuda" and softcap:
        out.append(f"loss head on CPU: TRL's own chunked path, not duet's (the model caps its final logits at {softcap:g} "
                   "with tanh, which duet's CPU loss head does not apply: training/run/fast_loss.py hands such a model to TRL)")
    elif device != "cuda":
        out.append(f"loss head on CPU: duet's chunked log-softmax (training/run/fast_loss.py, {cpu_loss_chunk_tokens(vocab)}-"
                   f"token chunks x the {vocab:,}-token vocabulary) scores only the labelled positions through native "
                   "reductions; TRL's CPU fallback scores padding too and walks each logits tile about a dozen times "
                   "(measured 1.5x tokens/s on the demo's LoRA step)")
        lora = duet_cpu_lora(cfg, device, dtype)
        if lora and dtype == "bf16":
            out.append("LoRA update added in fp32 (training/run/cpu_lora.py): the base layers' matmuls run in bf16, the "
                       "low-rank update and its sum with the base output in fp32; in bf16 most of an early update rounds "
                       "away (measured on the demo: eval loss 0.05 above the fp32 script's; 0.007 with the fp32 update, "
                       "for ~5 % of the speed)")
        if lora and cfg.cpu.fast_dropout:
            out.append("LoRA dropout masks drawn 16 bits an element, three from each 64-bit draw, where torch's CPU "
                       "dropout draws one sample at a time, and one mask for the adapters that read the same input "
                       "(q, k and v; gate and up), as one adapter on a fused qkv or gate_up projection has "
                       "(training/run/cpu_lora.py; measured on the demo: +7-9 % tokens/s in fp32 for the draw, "
                       "+5 % for the shared masks; train.cpu.fast_dropout: false for torch's own, one an adapter)")
        out.append("torch.compile off on CPU: inductor recompiled for each new padded batch length and 20 demo steps "
                   "took over 8 minutes on 2 cores, several times the eager run (measured, not kept)")
    else:
        out.append("Liger kernels, torch.compile and packing by default on CUDA: not yet measured on a GPU with this "
                   "stack, so off (Liger, compile) or by the padding rule (packing) until benchmarks/gpu_check.sh has")
    return out



@dataclass
class Plan:
    config: TrainConfig
    model: ModelProfile
    device: str
    dtype: str
    breakdown: dict[str, int]
    budget_bytes: int
    trainable_params: int
    suggestions: list[dict]
    steps_per_epoch: int | None = None
    decisions: list[str] | None = None
    calibration: dict | None = None
    host_ram_bytes: int | None = None
    gpu_count: int | None = None  # the host's GPUs (None: not known; a data-parallel plan is then not checked)

    @cached_property
    def phases(self) -> dict:
        from training.plan.plan_phases import phase_estimates

        return phase_estimates(self.config, self.model, self.device, self.dtype == "bf16", self.breakdown,
                               self.calibration["factor"] if self.calibration else 1.0,
                               host_ram_bytes=self.host_ram_bytes, budget_bytes=self.budget_bytes,
                               phase_factors=(self.calibration or {}).get("phases"))

    @property
    def formula_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_bytes(self) -> int:
        """The estimate: the formula's total, scaled by a measured calibration factor when there is one
        (the factor applies to what the measurement saw: everything but the CUDA context)."""
        return scaled_total(self.breakdown, self.calibration["factor"] if self.calibration else 1.0)

    @property
    def fits(self) -> bool:
        """Training fits the budget, and every later phase fits where the engine will run it (the merge
        falls back to host RAM when the GPU has no room)."""
        if self.total_bytes * self.replicas > self.budget_bytes * USABLE_FRACTION:
            return False
        if self.device == "cuda" and self.gpu_count is not None and self.config.world_size > self.gpu_count:
            return False
        return all(p["where"] != "nowhere" for p in self.phases.values())

    @property
    def replicas(self) -> int:
        """Copies of the per-worker estimate that share ``budget_bytes``: every worker on a CPU host (they
        share its RAM), one on a GPU (each worker has a GPU of its own, which the budget describes)."""
        return 1 if self.device == "cuda" else self.config.world_size

    def to_dict(self) -> dict:
        ctx = self.breakdown.get("cuda_context", 0)
        return {
            "train": self.config.model_dump(),
            "device": self.device, "dtype": self.dtype,
            "model": {"type": self.model.model_type, "params": self.model.params,
                      "layers": self.model.layers, "hidden": self.model.hidden, "vocab": self.model.vocab},
            "trainable_params": self.trainable_params,
            "effective_batch": self.config.effective_batch,
            "workers": self.config.world_size, "global_batch": self.config.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "estimate": {"breakdown_bytes": self.breakdown, "formula_bytes": self.formula_bytes,
                         "total_bytes": self.total_bytes, "torch_reserved_bytes": self.total_bytes - ctx,
                         "host_bytes": self.total_bytes * self.replicas,  # what the host needs free: every worker's on CPU
                         "budget_bytes": self.budget_bytes, "fits": self.fits,
                         "usable_fraction": USABLE_FRACTION, "calibration": self.calibration,
                         "phases": self.phases,
                         "whole_run_bytes": max(p["total_bytes"] for p in self.phases.values())},
            "decisions": self.decisions or [],
            "suggestions": self.suggestions,
        }


def measured_formula_bytes(breakdown: dict[str, int]) -> int:
    """The formula's bytes in the accounting of a measured peak: without the CUDA context."""
    return sum(breakdown.values()) - breakdown.get("cuda_context", 0)


def _similar(fact: dict, cfg: TrainConfig, model: ModelProfile, device: str, host: str | None) -> int | None:
    """How close a measured run is to this plan (lower is closer), or None if not comparable."""
    d = fact.get("data") or {}
    t = d.get("train") or {}
    if d.get("device") != device or (host and d.get("host") != host):
        return None
    if d.get("model_params") not in (None, model.params) or t.get("method") != cfg.method or t.get("phase") != cfg.phase:
        return None
    if not d.get("peak_bytes") or not d.get("formula_bytes"):
        return None
    return sum(t.get(k) != getattr(cfg, k) for k in ("micro_batch", "seq_len", "gradient_checkpointing", "packing")) + \
        (t.get("lora", {}).get("r") != cfg.lora.r)


def calibrate(cfg: TrainConfig, model: ModelProfile, device: str, host: str | None, facts: list[dict]) -> dict | None:
    """The closest measured run on the same host, model, method and phase -> a correction factor."""
    best = None
    for f in facts:
        dist = _similar(f, cfg, model, device, host)
        if dist is not None and (best is None or dist < best[0]):
            best = (dist, f)
    if best is None:
        return None
    d = best[1]["data"]
    # the run's peak against the formula of the configuration that ran (after any OOM re-plan), both
    # without the CUDA context; records written before duet kept that apart carry the context in
    # formula_bytes and the planned micro-batch in train
    factor = d["peak_bytes"] / d["formula_bytes"]
    return {"factor": round(factor, 4), "phases": d.get("phase_ratios") or {},
            "from_run": (best[1].get("provenance") or {}).get("run_id"),
            "measured_bytes": d["peak_bytes"], "formula_bytes_then": d["formula_bytes"], "distance": best[0],
            "note": f"scaled by the peak measured in run {(best[1].get('provenance') or {}).get('run_id')} on this host"}


def resolve_workers(cfg: TrainConfig, device: str, gpu_count: int | None) -> tuple[TrainConfig, str | None]:
    """``workers: auto`` -> the host's GPUs on CUDA, 1 on CPU; and the decision that explains a
    data-parallel plan (its global batch, and where the memory estimate applies)."""
    asked = cfg.workers
    n = (max(1, gpu_count or 1) if device == "cuda" else 1) if asked == "auto" else asked
    cfg = cfg.model_copy(update={"workers": n})
    if n == 1:
        return cfg, ("workers 1 (auto on CPU: one process; set workers: N for N)" if asked == "auto" and device != "cuda"
                     else None)
    where = ("one a GPU; the memory estimate below is each GPU's" if device == "cuda" else
             "processes on this CPU host; they share its RAM, so the estimate below counts once a worker")
    return cfg, (f"data parallel over {n} workers through Ray Train ({where}): global batch {cfg.micro_batch} x "
                 f"{cfg.grad_accum} x {n} = {cfg.global_batch} sequences an optimizer step; each worker sees a "
                 "different slice of every global batch (the same data order as one process with a "
                 f"{n}x micro-batch)")


def make_plan(cfg: TrainConfig, model: ModelProfile, *, device: str, bf16: bool, budget_bytes: int,
              train_examples: int | None = None, host: str | None = None, facts: list[dict] | None = None,
              token_p50: int | None = None, token_mean: float | None = None,
              host_ram_bytes: int | None = None, gpu_count: int | None = None,
              cpu_bf16_speedup: float | None = None) -> Plan:
    """Estimate ``cfg``; resolve ``gradient_checkpointing`` and ``packing`` ``auto``; when it does not
    fit, propose the nearest plans that do. ``facts``: cortex measurements that calibrate the
    estimate; ``token_p50``/``token_mean``: the dataset's median and mean example length in tokens.

    Packing chosen here replaces padding and nothing else: the packed micro-batch holds about as many
    examples as ``micro_batch`` unpacked rows would, so an optimizer step sees the same data (and the
    learning curve stays comparable) while the forward pass carries fewer, padding-free tokens.

    Long because its decisions (dtype, checkpointing, packing, calibration, phases) each read the previous ones."""
    check_emulated_dtype(cfg, device, bf16, cpu_bf16_speedup)
    decisions = []
    cfg, text = resolve_workers(cfg, device, gpu_count)
    if text:
        decisions.append(text)
    examples_per_step = cfg.effective_batch
    if cfg.packing == "auto":
        # CPU: off. SDPA on a CPU attends over a packed row under a dense block mask, seq_len^2 per row, and
        # that cost more than the padding it saves (benchmarks/speed.py: 0.82x tokens/s on the demo data)
        pack = cfg.phase == "sft" and device == "cuda" and token_p50 is not None and token_p50 <= cfg.seq_len // 2
        cfg = cfg.model_copy(update={"packing": pack})
        if pack:
            decisions.append(f"packing on: the median example is {token_p50} tokens of {cfg.seq_len}; padding each "
                             "batch to its longest would spend compute on padding")
            mean = max(1.0, token_mean or token_p50)
            rows = max(1, math.ceil(cfg.micro_batch * mean / cfg.seq_len))
            if rows < cfg.micro_batch:
                decisions.append(f"packed micro-batch {rows} x {cfg.seq_len} tokens: holds ~{rows * cfg.seq_len / mean:.0f} "
                                 f"examples of ~{mean:.0f} tokens where {cfg.micro_batch} unpacked rows held "
                                 f"{cfg.micro_batch}, so an optimizer step sees about the same data")
                # evaluation stays unpacked: it keeps the rows it had
                cfg = cfg.model_copy(update={"micro_batch": rows, "eval_batch": cfg.eval_batch or cfg.micro_batch})
            examples_per_step = cfg.effective_batch * cfg.seq_len / mean
        else:
            decisions.append("packing off: " + ("DPO pairs are not packed" if cfg.phase != "sft" else
                                                "on CPU, SDPA attends over a packed row under a dense block mask "
                                                "(seq_len^2 a row), which cost more than padding (measured 0.82x "
                                                "tokens/s on the demo data)" if device != "cuda" else
                                                "no token statistics" if token_p50 is None else
                                                f"the median example ({token_p50} tokens) fills over half of seq_len"))
    if device != "cuda" and cfg.phase == "sft" and cfg.packing is False and cfg.cpu.padding_free:
        why = padding_free_refusal(model.sliding_window, model.attn_softcap, cfg.seq_len)
        if why:
            cfg = cfg.model_copy(update={"cpu": cfg.cpu.model_copy(update={"padding_free": False})})
            decisions.append(f"padding-free batches off: {why}; padded rows")
        else:
            decisions.append("padding-free batches on CPU (training/run/padding_free.py): each micro-batch's "
                             "examples end to end in one row, attention computed example by example, so no matmul "
                             "runs on padding; the same examples, positions and labels as padded rows (measured "
                             "1.28x tokens/s on the demo's fp32 LoRA step; train.cpu.padding_free: false for padded rows)")
    if cfg.gradient_checkpointing == "auto":
        off = cfg.model_copy(update={"gradient_checkpointing": False})
        bd_off = estimate(off, model, device, bf16)
        cal = calibrate(off, model, device, host, facts or [])
        total_off = scaled_total(bd_off, cal["factor"] if cal else 1.0)
        if total_off * (1 if device == "cuda" else cfg.world_size) <= budget_bytes * USABLE_FRACTION:
            cfg = off
            decisions.append("gradient checkpointing off: the plan fits without it (it would cost ~30 % speed)")
        else:
            cfg = cfg.model_copy(update={"gradient_checkpointing": True})
            decisions.append(f"gradient checkpointing on: without it the estimate is {total_off / GIB:.2f} GiB")
    decisions.append(dtype_decision(cfg, device, bf16))
    decisions.extend(speed_decisions(cfg, device, model.vocab, train_dtype(cfg, device, bf16), model.logit_softcap))
    if cfg.method == "qlora":
        dt = train_dtype(cfg, device, bf16)
        saved = qlora_head_saving(model, dt)
        decisions.append(
            f"QLoRA: lm_head kept in {dt} after peft's fp32 upcast, saving {saved / GIB:.2f} GiB (frozen, its values are "
            "the checkpoint's either way, and the fused loss computes in the compute dtype); the input embeddings "
            "stay fp32 (the residual stream's dtype)" if saved else
            "QLoRA: embeddings and lm_head in fp32 as peft upcasts them (" +
            ("an fp32 plan" if dt == "fp32" else "a tied head is the embedding matrix: kept fp32 for the residual stream")
            + ")")
    if device == "cuda":
        decisions.append(f"loss through TRL's fused LM head: {min(cfg.micro_batch * cfg.seq_len, FUSED_TOKEN_TILE)} x "
                         f"{min(model.vocab, FUSED_VOCAB_TILE)} tiles, never the {model.vocab:,}-wide logits of every "
                         "token; attention through SDPA's flash kernel (no heads x seq^2 scores)")
    bd = estimate(cfg, model, device, bf16)
    cal = calibrate(cfg, model, device, host, facts or [])
    plan = Plan(cfg, model, device, train_dtype(cfg, device, bf16), bd, budget_bytes,
                model.params if cfg.method == "full" else model.lora_params(cfg.lora), [],
                decisions=decisions, calibration=cal, host_ram_bytes=host_ram_bytes, gpu_count=gpu_count)
    merge = plan.phases["merge"]
    if merge["where"] == "nowhere":
        decisions.append(f"the merge needs ~{merge['total_bytes'] / GIB:.1f} GiB: more than the GPU has left and "
                         f"than the host's free RAM; the plan does not fit")
    elif merge["where"] == "cpu" and device == "cuda":
        decisions.append(f"the merge (~{merge['total_bytes'] / GIB:.1f} GiB) runs in host RAM: the GPU has no room")
    if cal:
        decisions.append(cal["note"] + f" (x{cal['factor']:.2f})")
    if device == "cuda" and gpu_count is not None and cfg.world_size > gpu_count:
        decisions.append(f"workers {cfg.world_size}, but this host has {gpu_count} GPU(s): a run trains on one host "
                         "(data parallel across executor hosts is not supported yet); the plan does not fit here")
    if train_examples:
        plan.steps_per_epoch = math.ceil(train_examples / (examples_per_step * cfg.world_size))
    if not plan.fits:
        factor = cal["factor"] if cal else 1.0
        plan.suggestions = suggest(cfg, model, device=device, bf16=bf16, budget_bytes=budget_bytes, factor=factor)
    return plan


def suggest(cfg: TrainConfig, model: ModelProfile, *, device: str, bf16: bool, budget_bytes: int,
            factor: float = 1.0) -> list[dict]:
    """Nearest fitting variants, in order of how little they change: keep the effective batch
    (smaller micro-batch, more accumulation), then gradient checkpointing, then QLoRA, then a
    shorter sequence."""
    tries: list[tuple[str, dict]] = []
    mb, ga = cfg.micro_batch, cfg.grad_accum
    while mb > 1:
        mb //= 2
        ga *= 2
        tries.append((f"micro-batch {mb} x accumulation {ga} (same effective batch)",
                      {"micro_batch": mb, "grad_accum": ga}))
    base: dict = {}
    steps = [("gradient checkpointing", {"gradient_checkpointing": True})]
    if cfg.method != "qlora":
        steps.append(("QLoRA (4-bit base)", {"method": "qlora"}))
    for label, change in steps:
        base.update(change)
        tries.append((label, dict(base)))
        mb, ga = cfg.micro_batch, cfg.grad_accum
        while mb > 1:
            mb //= 2
            ga *= 2
            tries.append((f"{label}, micro-batch {mb} x accumulation {ga}",
                          {**base, "micro_batch": mb, "grad_accum": ga}))
    seq = cfg.seq_len
    while seq > 256:
        seq //= 2
        tries.append((f"QLoRA, gradient checkpointing, micro-batch 1, seq-len {seq}",
                      {**base, "micro_batch": 1, "grad_accum": cfg.effective_batch, "seq_len": seq}))
    out = []
    for label, change in tries:
        c2 = cfg.model_copy(update=change)
        bd = estimate(c2, model, device, bf16)
        total = scaled_total(bd, factor)
        if total <= budget_bytes * USABLE_FRACTION:
            out.append({"change": label, "set": change, "total_bytes": total, "breakdown_bytes": bd})
            if len(out) >= 3:
                break
    return out


def formula_bytes_for(cfg: TrainConfig, model_dir, device: str, dtype: str) -> int | None:
    """The planner's formula for the configuration that ran (after any OOM re-plan), in the
    accounting of ``train_peak_bytes`` (no CUDA context): what calibration divides by. None when
    the model's config cannot be profiled."""
    try:
        prof = ModelProfile.from_config(Path(model_dir) / "config.json")
        bd = estimate(cfg, prof, device, bf16=dtype == "bf16")
    except (PlanError, ValueError, OSError):
        return None
    return measured_formula_bytes(bd)
