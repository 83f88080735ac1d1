"""The planner's memory model: a model's profile (from its config.json, no weights) and a training
config -> peak bytes by component.

No torch here: the architect plans on a laptop. Formulas (bytes):

- weights: params x bytes/param (fp32 4, bf16/fp16 2, nf4 with double quantization 4.127 bits
  = 0.516 bytes); with QLoRA the embeddings and lm_head are kept in fp32 (peft's
  prepare_model_for_kbit_training upcasts every non-quantized parameter);
- LoRA: r x (in + out) per adapted matrix; trainable params x (weight + grad in the train dtype
  + AdamW's two fp32 moments, + an fp32 master copy when training in 16-bit) = 16 bytes: PEFT keeps
  adapters in fp32; a full fine-tune keeps fp32 weights under autocast: 4 + 4 + 8 bytes a parameter;
- activations per layer and token, in elements of the train dtype (fp32 on CPU, bf16 included: the
  residual stream stays fp32 beside LoRA's fp32 update; x ACTIVATIONS_CPU_BF16 under bf16 autocast on
  CPU, fitted there), 22 h + 5 i without gradient
  checkpointing (fp32 RMSNorm inputs, q/k/v, their rotary, head-major and GQA-expanded copies, the
  attention output and what SDPA keeps for its backward, MLP gate/up/act/down inputs; fitted to
  duet's training path with benchmarks/vram_planner.py), plus 6 h + i for LoRA dropout's copies of
  each adapted input when dropout > 0 and not DPO (TRL's DPO disables dropout; QLoRA: x 0.8, measured;
  3 h + i for LoRA on CPU, where q/k/v and gate/up share one dropped copy); with checkpointing, the layer's
  input (h) per layer on CUDA, 13 h on CPU in fp32 and 17 h under bf16 autocast (measured there: more
  than the input is kept), plus one layer's full set.
  No attention scores: SDPA's flash kernels (CUDA, and CPU in torch 2.13) never hold heads x seq^2
  (measured: the same tokens at seq 512 and 1024 take the same memory), except a packed row on CPU:
  its block-diagonal mask sends SDPA down torch's math path, which keeps every layer's heads x seq^2
  scores (``attention_scores``, PACKED_SCORE_BYTES_CPU a score);
- loss head: TRL 1.16 computes the SFT and DPO losses through a fused LM head that never holds the
  logits, only [4096 tokens x 32768 vocabulary] tiles (``loss_head_bytes``);
- overhead: allocator slack (8 % + 256 MiB) on a GPU, the CUDA context (~500 MiB) reported
  apart because torch.cuda.max_memory_reserved() does not see it; the runtime (640 MiB: torch,
  tokenizers, datasets) on CPU.

``gradient_checkpointing: auto`` (the default) turns it on only when the plan does not fit
without it: checkpointing costs ~30 % throughput.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from training.config import LoraSettings, PlanError, TrainConfig

GIB = 1024 ** 3
MIB = 1024 ** 2


def attention_limits(cfg: dict) -> tuple[int | None, float | None]:
    """From a model's config (config.json's text part, or a transformers config's ``to_dict()``): the sliding
    window its attention uses (None where it attends to the whole sequence: no window, or Qwen's
    ``use_sliding_window: false``) and its attention-logit soft-cap (Gemma 2), or None."""
    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    window, cap = cfg.get("sliding_window"), cfg.get("attn_logit_softcapping")
    used = cfg.get("use_sliding_window", True) is not False or "sliding_attention" in (cfg.get("layer_types") or ())
    return (int(window) if positive(window) and used else None), (float(cap) if positive(cap) else None)


def padding_free_refusal(window: int | None, attn_softcap: float | None, seq_len: int) -> str | None:
    """Why a model keeps padded rows on CPU (training/run/padding_free.py), or None: the planner's decision
    and the trainer's check are this one rule."""
    if attn_softcap:
        return f"its attention caps logits at {attn_softcap:g}, which SDPA does not do"
    if window and window < seq_len:
        return f"its sliding window ({window} tokens) is shorter than seq_len ({seq_len})"
    return None


@dataclass
class ModelProfile:
    """What the planner needs from a model's config.json (no weights)."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    logit_softcap: float | None = None   # Gemma 2's final_logit_softcapping: TRL's own loss path applies it
    fused_projections: bool = False      # Phi-3: one qkv_proj and one gate_up_proj a block
    sliding_window: int | None = None    # the attention's window where it uses one (attention_limits)
    attn_softcap: float | None = None    # Gemma 2's attn_logit_softcapping

    @classmethod
    def from_config(cls, cfg: dict | str | os.PathLike) -> "ModelProfile":
        if not isinstance(cfg, dict):
            p = Path(cfg)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise PlanError(f"{cfg}: no config.json (give a model folder or its config.json)")
            from training.data.schema import parse_json

            try:
                cfg = parse_json(p.read_bytes().decode("utf-8-sig"), str(p))
            except UnicodeDecodeError as exc:
                raise PlanError(f"{p}: not UTF-8 (byte {exc.start})") from exc
            except ValueError as exc:
                raise PlanError(str(exc)) from exc
        if not isinstance(cfg, dict):
            raise PlanError("model config: expected a JSON object")
        from training.export.gguf_convert import family
        from training.export.gguf_write import ExportError

        try:
            family(cfg)  # a family duet cannot train and export end to end is refused before anything runs
        except ExportError as exc:
            raise PlanError(str(exc)) from exc
        if isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]

        def shape(key: str, default: object = None, required: bool = True) -> int:
            v = cfg.get(key, default)
            if v is None and not required:
                return 0
            if v is None:
                raise PlanError(f"model config lacks {key!r} (needed to plan)")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 10**9:
                raise PlanError(f"model config field {key!r}: {v!r} is not a positive whole number (1..10^9)")
            return v

        hidden = shape("hidden_size")
        heads = shape("num_attention_heads")
        head_dim = shape("head_dim", required=False)
        if not head_dim:
            if hidden % heads:
                raise PlanError(f"model config: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                                "(and there is no head_dim)")
            head_dim = hidden // heads
        kv = shape("num_key_value_heads", required=False) or heads
        if heads % kv:
            raise PlanError(f"model config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        tied = cfg.get("tie_word_embeddings", False)
        cap = cfg.get("final_logit_softcapping")
        mt = str(cfg.get("model_type", "unknown"))[:64]
        window, attn_cap = attention_limits(cfg)
        return cls(model_type=mt, hidden=hidden, sliding_window=window, attn_softcap=attn_cap,
                   layers=shape("num_hidden_layers"), intermediate=shape("intermediate_size", required=False) or 4 * hidden,
                   heads=heads, kv_heads=kv, head_dim=head_dim, vocab=shape("vocab_size"),
                   tied_embeddings=tied if isinstance(tied, bool) else bool(tied),
                   logit_softcap=float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0
                   else None, fused_projections=mt == "phi3")

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block, by the module names LoRA targets: q/k/v/o
        and gate/up/down (Llama, Qwen, Mistral, Gemma), or Phi-3's fused qkv_proj and gate_up_proj."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        if self.fused_projections:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * self.intermediate),
                    "down_proj": (self.intermediate, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}

    @property
    def block_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes.values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embedding_params + self.hidden

    def lora_params(self, lora: LoraSettings) -> int:
        shapes = self.linear_shapes
        names = shapes.keys() if lora.target_modules == "all-linear" else \
            [n for n in shapes if n in lora.target_modules]
        return self.layers * sum(lora.r * (shapes[n][0] + shapes[n][1]) for n in names)


def train_dtype(cfg: TrainConfig, device: str, bf16: bool) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device == "cuda":
        return "bf16" if bf16 else "fp16"
    # CPU: bf16 where the CPU has it natively (LoRA and full fine-tunes; QLoRA's 4-bit CPU kernels in
    # bitsandbytes 0.50 are the ones with the AVX512-BF16 defect, so QLoRA stays fp32 there)
    return "bf16" if bf16 and cfg.method != "qlora" else "fp32"


def duet_cpu_lora(cfg: TrainConfig, device: str, dtype: str) -> bool:
    """Whether a run trains its LoRA layers through duet's CPU forward (training/run/cpu_lora.py): LoRA on a
    CPU in fp32, or in bf16 with ``train.cpu.lora_fp32``. The trainer installs it and the planner estimates
    and describes it by this one rule; its dropout is duet's when ``train.cpu.fast_dropout`` is on too."""
    return device != "cuda" and cfg.method == "lora" and (dtype == "fp32" or dtype == "bf16" and cfg.cpu.lora_fp32)


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_CONTEXT_BYTES = 500 * MIB
GPUS = {  # --gpu NAME: memory and bf16 support
    "rtx3060": (12 * GIB, True), "rtx3080": (10 * GIB, True), "rtx3090": (24 * GIB, True),
    "rtx4060ti": (16 * GIB, True), "rtx4070": (12 * GIB, True), "rtx4080": (16 * GIB, True),
    "rtx4090": (24 * GIB, True), "rtx5090": (32 * GIB, True), "t4": (15 * GIB, False), "v100": (16 * GIB, False),
    "a10": (24 * GIB, True), "l4": (24 * GIB, True), "a100-40": (40 * GIB, True), "a100-80": (80 * GIB, True),
    "h100": (80 * GIB, True), "h200": (141 * GIB, True),
}
NF4_DQ_BYTES = 4.127 / 8


# Measured with benchmarks/vram_planner.py through duet's own training path (CPU, TRL 1.16, torch 2.13):
QLORA_ACTIVATIONS = 0.80            # bitsandbytes' 4-bit matmul keeps fewer copies than a LoRA-wrapped Linear
CHECKPOINT_KEPT_CPU = 13            # with checkpointing on CPU, elements of h kept a token per layer (on CUDA: the
                                    # layer's input only, h; benchmarks/gpu_check.sh measures it there)
CHECKPOINT_KEPT_CPU_BF16 = 17       # the same under bf16 autocast on CPU (benchmarks/vram_planner.py: SmolLM2's shape,
                                    # 8 x 512 with checkpointing; autocast's bf16 copies sit beside the fp32 stream)
ACTIVATIONS_CPU_BF16 = 0.82        # under bf16 autocast on CPU a layer keeps 0.82 of the fp32 formula's bytes: autocast's
                                    # bf16 outputs of the frozen projections are half of what the fp32 stream keeps
                                    # (benchmarks/vram_planner.py on the AVX512-BF16 machine: 0.76-0.93 over the
                                    # unpacked and packed SFT rows without checkpointing, median 0.82)
RUNTIME_CPU = 640 * MIB             # the process before any model: torch, transformers, TRL, datasets (measured: demo)
DPO_ACTIVATIONS_CPU_BF16 = 0.85    # TRL 1.16's DPO on CPU under bf16 keeps less than the SFT formula's activations per
                                    # token (benchmarks/vram_planner.py, exact peak RSS over the formula: 0.60-0.65 at 4
                                    # layers, 2 x 512 and 4 x 256; SmolLM2's shape, 2 x 256 and 1 x 512, 0.63 in one run
                                    # and 0.83 in the next: the peak is bimodal there). The largest, so a plan never
                                    # under-counts; fp32 DPO is not measured and keeps the SFT formula
TRAINING_LOOP_CPU = 64 * MIB        # the trainer's own allocations during train() (optimizer setup, batches)
PACKED_SCORE_BYTES_CPU = 2          # per attention-score element of a packed row on CPU, bf16 (benchmarks/vram_planner.py:
                                    # packed minus unpacked at equal tokens, 1.8 on SmolLM2's shape (4 x 512) and
                                    # 2.3 on the tiny one (4 x 1024): the bf16 probabilities the backward keeps)
FUSED_TOKEN_TILE = 4096    # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE (TRL 1.16)
FUSED_VOCAB_TILE = 32768   # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


# duet's CPU loss head (training/run/fast_loss.py) holds one token chunk of fp32 logits: 2**25 elements
# (128 MiB), so 682 tokens of a 49k vocabulary, 220 of a 152k one.
CPU_LOSS_CHUNK_ELEMENTS = 2 ** 25


def cpu_loss_chunk_tokens(vocab: int) -> int:
    return max(16, CPU_LOSS_CHUNK_ELEMENTS // max(1, vocab))


def loss_head_bytes(tokens: int, vocab: int, hidden: int, compute_bytes: int, device: str, *,
                    backward: bool = True) -> int:
    """SFT's and DPO's losses never materialize the logits of every token. On CUDA, TRL 1.16's fused
    LM head projects [4096 tokens x 32768 vocabulary] tiles in the compute dtype and a Triton kernel
    folds each tile in place. On CPU, duet's loss head (training/run/fast_loss.py) projects one chunk of
    tokens against the whole vocabulary: the chunk in the compute dtype, its fp32 upcast and one more
    fp32 tile (the softmax for the entropy metric, or the backward's gradient). The backward adds the
    fp32 gradient of the hidden states."""
    if device == "cuda":
        tile, per_element = min(tokens, FUSED_TOKEN_TILE) * min(vocab, FUSED_VOCAB_TILE), compute_bytes
    else:
        tile, per_element = min(tokens, cpu_loss_chunk_tokens(vocab)) * vocab, compute_bytes + 8
    return int(tile * per_element + (tokens * hidden * 4 if backward else 0))


def qlora_head_saving(model: ModelProfile, dtype: str) -> int:
    """Bytes a 16-bit QLoRA plan saves by keeping an untied lm_head in its dtype after peft upcasts
    it to fp32 (training.run.engine.load_train_model): the head is frozen, its values are exactly the
    checkpoint's 16-bit ones either way, and TRL's fused loss casts its tiles to the compute dtype, so
    fp32 storage buys nothing. The input embeddings stay fp32 (they set the residual stream's dtype)."""
    if dtype == "fp32" or model.tied_embeddings:
        return 0
    return model.vocab * model.hidden * 2


def estimate(cfg: TrainConfig, model: ModelProfile, device: str = "cuda", bf16: bool = True) -> dict[str, int]:
    """Peak memory estimate in bytes, by component (see the module docstring for the formulas)."""
    dt = train_dtype(cfg, device, bf16)
    wb = DTYPE_BYTES[dt]
    emb = model.embedding_params + model.hidden
    body = model.params - emb
    if cfg.method == "qlora":
        weights = body * NF4_DQ_BYTES + emb * 4 - qlora_head_saving(model, dt)
    elif cfg.method == "full":
        weights = model.params * 4  # the engine keeps fp32 weights and trains under bf16/fp16 autocast
    else:
        weights = model.params * wb
    trainable = model.params if cfg.method == "full" else model.lora_params(cfg.lora)
    if cfg.method == "full":
        trainable_bytes = trainable * (4 + 8)  # fp32 gradient + AdamW's fp32 m, v (the weights are above)
    else:  # PEFT keeps adapter weights in fp32: weight + grad + Adam m, v = 16 bytes in every dtype
        master = 4 if wb < 4 else 0
        trainable_bytes = trainable * (wb + wb + 8 + master)
    tokens = cfg.micro_batch * cfg.seq_len
    h, i = model.hidden, model.intermediate
    per_token = 22 * h + 5 * i
    if cfg.method != "full" and cfg.lora.dropout > 0 and cfg.phase != "dpo":  # DPOConfig.disable_dropout (TRL's default)
        # duet's CPU LoRA dropout (training/run/cpu_lora.py) drops q/k/v's input once and gate/up's once
        per_token += (3 if duet_cpu_lora(cfg, device, dt) and cfg.cpu.fast_dropout else 6) * h + i
    # what a layer keeps for its backward is in the compute dtype, except on CPU under bf16 autocast: the
    # residual stream stays fp32 there (LoRA's fp32 update, training/run/cpu_lora.py) and autocast keeps bf16
    # copies beside it (measured: the same bytes as an fp32 run, benchmarks/vram_planner.py)
    ab = 4 if device != "cuda" else wb
    per_layer_full = tokens * per_token * ab
    if device != "cuda" and wb == 2:
        per_layer_full *= ACTIVATIONS_CPU_BF16
    if cfg.method == "qlora":
        per_layer_full *= QLORA_ACTIVATIONS
    if cfg.gradient_checkpointing is True:
        kept = 1 if device == "cuda" else CHECKPOINT_KEPT_CPU_BF16 if wb == 2 else CHECKPOINT_KEPT_CPU
        activations = model.layers * tokens * kept * h * ab + per_layer_full
    else:
        activations = model.layers * per_layer_full
    pairs = 2 if cfg.phase == "dpo" else 1  # DPO: chosen + rejected in one batch
    if cfg.phase == "dpo" and device != "cuda" and wb == 2:
        activations *= DPO_ACTIVATIONS_CPU_BF16
    breakdown = {
        "weights": int(weights),
        "trainable_and_optimizer": int(trainable_bytes),
        "activations": int(activations) * pairs,
        "loss_head": loss_head_bytes(tokens * pairs, model.vocab, h, wb, device),
    }
    if device != "cuda" and cfg.packing is True and cfg.phase == "sft":
        # a packed row on CPU: SDPA under its block-diagonal mask takes torch's math path and keeps the
        # heads x seq^2 scores of every layer for the backward; with checkpointing, two layers' (the recomputed
        # one and the forward's own; not measured: benchmarks/vram_planner.py has no packed run with checkpointing)
        kept_layers = 2 if cfg.gradient_checkpointing is True else model.layers
        breakdown["attention_scores"] = int(kept_layers * cfg.micro_batch * model.heads * cfg.seq_len ** 2
                                            * PACKED_SCORE_BYTES_CPU)
    if cfg.phase == "dpo":
        # the frozen reference (the adapter disabled on the same weights): a no-grad forward, one
        # layer's activations at a time, and its own fused-head tile
        ref_head = loss_head_bytes(tokens * pairs, model.vocab, h, wb, device, backward=False)
        if device == "cuda":
            breakdown["dpo_reference"] = int(per_layer_full * pairs + ref_head)
        else:
            # TRL 1.16 runs it after the policy's forward, whose head tile is freed by then: a no-grad layer's
            # transient (its input, q, k, v, the MLP's gate, up and product) and a head tile without backward
            # add what they exceed the policy head's backward tile by (benchmarks/vram_planner.py, DPO rows).
            # The order is the same on CUDA, which keeps the full sum until benchmarks/gpu_check.sh measures
            # a DPO peak there: an estimate lowered without a measurement is the side that OOMs
            layer = tokens * pairs * (4 * h + 3 * i) * ab
            breakdown["dpo_reference"] = max(0, int(layer + ref_head - breakdown["loss_head"]))
    sub = sum(breakdown.values())
    if device == "cuda":
        breakdown["allocator_overhead"] = int(256 * MIB + 0.08 * sub)
        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
    else:
        breakdown["training_loop"] = int(TRAINING_LOOP_CPU)
        breakdown["overhead"] = int(RUNTIME_CPU)
    return breakdown


def scaled_total(breakdown: dict[str, int], factor: float) -> int:
    """A breakdown's total with a calibration ``factor`` applied to the part a measurement sees
    (torch.cuda.max_memory_reserved() does not see the CUDA context, so the context is added as is)."""
    ctx = breakdown.get("cuda_context", 0)
    return int((sum(breakdown.values()) - ctx) * factor + ctx)
