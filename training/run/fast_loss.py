"""duet's LM-head loss for CPUs: per-token log-probabilities of the labelled positions only, through
native fused reductions, in token chunks that never hold more than one chunk's logits.

TRL 1.16 computes SFT's and DPO's per-token log-probabilities with a fused LM head
(``trl.trainer.utils.add_fused_lm_head`` -> ``ChunkedLogProbFunction``). On a CUDA device a Triton
kernel folds each [4096 x 32768] logits tile in one pass and only labelled positions are scored. On a
CPU it falls back to torch ops that walk each fp32 tile about a dozen times in the forward and as often
again in the backward, and it scores every position, padding and prompt included (its compaction is
tied to Triton). Profiled on SmolLM2-135M (49,152-token vocabulary), that fallback is about half of a
LoRA step's time (benchmarks/speed.py measures it on and off).

``install()`` makes TRL's fused head, on CPU tensors only, use :class:`CpuLogProb` and score only the
labelled positions; CUDA and every other device keep TRL's kernel. It changes which positions are
scored, never what a scored position's log-probability is: the loss and its gradient are the same up
to floating-point rounding (tests/unit/test_fast_loss.py checks both against TRL's own function).
"""

from __future__ import annotations

import functools

import torch

from training.plan.memory_model import cpu_loss_chunk_tokens as chunk_tokens

def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            scale: float) -> torch.Tensor:
    """fp32 logits of one chunk: the projection in the compute dtype, then one upcast (and scale)."""
    z = torch.mm(h.to(dtype), weight.to(dtype).t())
    if bias is not None:
        z.add_(bias.to(dtype))
    z = z.float()
    if scale != 1.0:
        z.mul_(scale)
    return z


class CpuLogProb(torch.autograd.Function):
    """The interface of ``trl.kernels.ChunkedLogProbFunction`` (no logit soft-capping: a model with
    one goes to TRL's function): returns (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1),
    each None unless requested in ``outputs`` (log_probs always). Only log_probs carries a gradient;
    the other outputs are metrics."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("log_probs",)):
        dtype = _compute_dtype(hidden)
        scale = float(logit_scale) / float(temperature)
        n, vocab = hidden.shape[0], weight.shape[0]
        step = chunk_tokens(vocab)
        want = set(outputs)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        extra = {k: torch.empty(n, dtype=torch.bool if k == "is_top1" else torch.float32, device=hidden.device)
                 for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1") if k in want}
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, step):
                e = min(n, s + step)
                z = _logits(hidden[s:e], weight, bias, dtype, scale)
                t = targets[s:e].unsqueeze(1)
                lse[s:e] = torch.logsumexp(z, dim=1)
                logprobs[s:e] = z.gather(1, t).squeeze(1) - lse[s:e]
                if "is_top1" in extra:
                    extra["is_top1"][s:e] = z.argmax(dim=1) == targets[s:e]  # first maximum, as TRL counts it
                if "mean_logits" in extra:
                    extra["mean_logits"][s:e] = z.mean(dim=1)
                if "entropy" in extra or "log_sum_sq_probs" in extra:
                    logp = z.sub_(lse[s:e].unsqueeze(1))  # z is dead from here: log-softmax in place
                    prob = logp.exp()
                    # row-wise dot products through einsum (a batched matmul: no [tokens x vocab] temporary)
                    if "entropy" in extra:
                        extra["entropy"][s:e] = -torch.einsum("ij,ij->i", prob, logp)
                    if "log_sum_sq_probs" in extra:
                        extra["log_sum_sq_probs"][s:e] = torch.log(torch.einsum("ij,ij->i", prob, prob))
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype, ctx.scale, ctx.step = dtype, scale, step
        ctx.mark_non_differentiable(*extra.values())
        return (logprobs, extra.get("entropy"), extra.get("log_sum_sq_probs"), extra.get("mean_logits"),
                extra.get("is_top1"))

    @staticmethod
    def backward(ctx, grad_logprobs, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logprobs is None:
            return (None,) * 9
        g = grad_logprobs.float()
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(ctx.dtype)
        for s in range(0, hidden.shape[0], ctx.step):
            e = min(hidden.shape[0], s + ctx.step)
            z = _logits(hidden[s:e], weight, bias, ctx.dtype, ctx.scale)
            # d log p_t / dz_j = 1[j = t] - p_j, times the incoming gradient and the logit scale
            grad = z.sub_(lse[s:e].unsqueeze(1)).exp_().mul_(-(g[s:e] * ctx.scale).unsqueeze(1))
            grad.scatter_add_(1, targets[s:e].unsqueeze(1), (g[s:e] * ctx.scale).unsqueeze(1))
            gd = grad.to(ctx.dtype)
            if grad_h is not None:
                grad_h[s:e] = torch.mm(gd, w).float()
            if grad_w is not None:
                grad_w.add_(torch.mm(gd.t(), hidden[s:e].to(ctx.dtype)).float())
            if grad_b is not None:
                grad_b.add_(grad.sum(dim=0))
        return (None if grad_h is None else grad_h.to(hidden.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


_INSTALLED: dict = {}


def install() -> bool:
    """Route TRL's fused LM head through :class:`CpuLogProb` for CPU tensors (idempotent). False when
    this TRL has no such hook (then TRL's own path runs unchanged)."""
    if _INSTALLED:
        return True
    try:
        import trl.trainer.utils as tu
    except ImportError:
        return False
    original_fn, original_compact = getattr(tu, "_ChunkedLogProbFunction", None), getattr(tu, "_use_triton", None)
    if original_fn is None or original_compact is None:
        return False

    class _Dispatch:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                  outputs=("log_probs",)):
            if hidden.device.type == "cpu" and softcap is None and _INSTALLED.get("on", True):
                return CpuLogProb.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap,
                                        logit_scale, outputs)
            return original_fn.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale,
                                     outputs)

    @functools.wraps(original_compact)
    def compact(device):
        # score only the labelled positions: on CPU nothing recompiles when their number changes
        return (device.type == "cpu" and _INSTALLED.get("on", True)) or original_compact(device)

    tu._ChunkedLogProbFunction, tu._use_triton = _Dispatch, compact
    _INSTALLED.update(original=(original_fn, original_compact), on=True)
    return True


def set_enabled(on: bool) -> None:
    """Switch the CPU path on or off after :func:`install` (benchmarks measure both in one process)."""
    install()
    _INSTALLED["on"] = bool(on)
