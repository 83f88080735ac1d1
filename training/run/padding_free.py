"""Padding-free SFT batches on a CPU: each micro-batch's examples laid end to end in one row, with
attention computed example by example, so no matmul ever runs on padding.

A padded micro-batch of four demo examples (58 to 150 tokens) is about 17 % padding, and on a CPU
every padded position costs what a real one does in each linear layer (the bulk of a step). TRL's
``padding_free`` collator removes the padding, but transformers then attends over the whole row under
a dense block-diagonal mask (row length squared, built each forward), and TRL refuses it without
packing when ``max_length`` is set. Here:

- :func:`collator` is the trainer's own collator with ``padding_free`` on. The dataset is still
  prepared and truncated to ``seq_len`` by TRL as for a padded run (only the collator changes), and
  the collator hands the example boundaries to the model (``cu_seq_lens_q``).
- :func:`install` gives the model an attention implementation, ``duet_segments``, which is SDPA run
  causally on each example's slice of the row (no mask), and SDPA itself for every other call (a
  padded batch with its mask: evaluation elsewhere, sampling, generation with a cache). Its mask
  function builds no mask for a row without one.

Every example is computed as in its padded row: the same examples in the same order, the same
positions, the same labels (the collator never lets one example's last token predict the next
example's first), so the loss and its gradient are equal up to floating-point rounding
(tests/unit/test_padding_free.py). Measured on the demo's fp32 LoRA step (SmolLM2-135M, 4 x 2
examples, 2 cores): 1.28x tokens/s over padded batches, TRL's padding-free collator with transformers'
block mask 1.19x (benchmarks/speed.py measures duet's run against the scripts). Under bf16 autocast an
example of up to ``FP32_UP_TO`` tokens is attended in fp32, where torch's CPU kernel is the faster one
(measured on the demo's bf16 LoRA step: 1.18x tokens/s over attending every example in bf16).

Not used for a model whose sliding window is shorter than ``seq_len`` (an example could then outrun
its window, which only a mask expresses) or whose attention caps its logits: the planner says so and
turns ``train.cpu.padding_free`` off. A model loaded with an attention other than SDPA (eager-only
models) keeps padded batches too: :func:`install` says why, and build_trainer logs it.
"""

from __future__ import annotations

import dataclasses

NAME = "duet_segments"
# Under bf16 autocast on a CPU, an example this short or shorter is attended in fp32: torch's CPU flash attention
# takes 1.6-3.7x longer for forward and backward in bf16 than in fp32 at 32-160 tokens (9 heads x 64 and
# 16 or 32 heads x 128, 2 cores, AMX), and less only from about 200 tokens on
FP32_UP_TO = 160
_SEGMENT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal", "seq_idx")


def _segments(query, attention_mask, kwargs) -> list[int] | None:
    """The example boundaries of a padding-free row (offsets 0 .. length), or None for any other call."""
    if attention_mask is not None or query.shape[0] != 1:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    pos = kwargs.get("position_ids")  # a padding-free row from another collator: positions restart per example
    if pos is None or pos.shape[-1] != query.shape[2]:
        return None
    starts = (pos.reshape(-1) == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return starts + [query.shape[2]]


def attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA on each example of a padding-free row (causal, no mask); SDPA as transformers calls it otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segs = _segments(query, attention_mask, kwargs) if query.shape[2] == key.shape[2] else None
    if segs is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in _SEGMENT_KEYS}
    short = FP32_UP_TO if (query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                           and torch.get_autocast_dtype("cpu") == torch.bfloat16) else 0
    outs = []
    for a, b in zip(segs, segs[1:]):
        q, k, v = query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]
        if b - a > short:
            outs.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **rest)[0])
            continue
        with torch.autocast("cpu", enabled=False):  # fp32: the faster kernel for a short example
            outs.append(sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, is_causal=True, **rest)[0])
    return torch.cat(outs, dim=1), None  # sdpa_attention_forward returns (batch, tokens, heads, dim)


def mask(**kw):
    """No mask for a row without one (causal within each example is :func:`attention`'s); SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    if (kw.get("attention_mask") is None and int(kw.get("q_offset") or 0) == 0 and int(kw.get("kv_offset") or 0) == 0
            and kw.get("q_length") == kw.get("kv_length")):
        return None
    return sdpa_mask(**kw)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)


def unsupported(config, seq_len: int) -> str | None:
    """Why a model (its transformers config) keeps padded batches, or None when it can train padding-free:
    the planner's rule (training.plan.memory_model.padding_free_refusal), and an attention other than SDPA."""
    from training.plan.memory_model import attention_limits, padding_free_refusal

    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", NAME):
        return f"its attention is {impl!r}, not SDPA"
    return padding_free_refusal(*attention_limits(cfg.to_dict()), seq_len)


def install(model, seq_len: int) -> str | None:
    """Give ``model`` (a transformers or peft model) the padding-free attention; returns None when done,
    else why not (the model is left as it was)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    why = unsupported(base.config, seq_len)
    if why:
        return why
    _register()
    base.config._attn_implementation = NAME
    return None


def collator(padded):
    """The trainer's padded collator (TRL's DataCollatorForLanguageModeling) with padding-free rows."""
    if not dataclasses.is_dataclass(padded) or not hasattr(padded, "padding_free"):
        raise TypeError(f"padding-free needs TRL's language-modeling collator, not {type(padded).__name__}")
    return dataclasses.replace(padded, padding_free=True)
