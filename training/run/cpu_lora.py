"""LoRA's update added in fp32 when a LoRA run trains its bf16 base under bf16 autocast on a CPU.

peft computes a LoRA layer as ``base(x) + B(A(dropout(x))) * scale`` and casts the sum back to the
base output's dtype. Under bf16 autocast both the low-rank product and the sum are rounded to bf16
(8 bits of mantissa): early in training the update is a few hundredths of a percent of the base
output, so most of it rounds away and the adapter learns from a forward pass it barely changes.
Measured with benchmarks/speed.py (SmolLM2-135M, 8 steps of 8 examples, same seed), that costs
0.05 in eval loss against the same run in fp32; adding the update in fp32 brings the gap to 0.007
for about 5 % of the bf16 speed-up.

:func:`install` gives each vanilla LoRA ``Linear`` of a model a forward that keeps the base layer in
bf16 (the large matmul, where bf16 is ~3x faster on a CPU with AVX512-BF16) and computes the
low-rank update and the sum in fp32, returning fp32 under autocast (the next bf16 matmul casts its
input anyway) and the base output's dtype without it (generation and merges on a bf16 model). Merged, disabled, mixed-batch and variant (DoRA) layers keep peft's own forward.

An fp32 LoRA run on a CPU installs it too, for its dropout only (the forward is then peft's, in fp32):
masks drawn 16 bits an element (:class:`_Dropout`), one for the adapters that read the same input
(:func:`_dropout`).
"""

from __future__ import annotations

import threading
import types
import weakref

import torch


class _Dropout(torch.autograd.Function):
    """Inverted dropout with a mask drawn 16 bits an element from the default generator: torch's CPU
    dropout draws one bernoulli sample at a time (~3 ms for 1024 x 576 fp32 on this CPU, about a third of
    a SmolLM2 LoRA step over its 210 adapted layers); three mask elements from one 64-bit draw and a
    masked fill take about a third of that. The drop probability is rounded to 1/65536; the mask is saved as bools (as
    torch.native_dropout saves it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        words = -(-n // 3)
        # random_() on int64 draws 63 uniform bits: the low three 16-bit words are uniform, the top one is not
        r = torch.empty(words, dtype=torch.int64, device=x.device).random_().view(torch.int16).view(words, 4)[:, :3]
        cut = round(p * 65536)
        drop = (r.reshape(-1)[:n] < cut - 32768).view(x.shape)
        ctx.scale = 65536 / (65536 - cut)
        ctx.save_for_backward(drop)
        return x.masked_fill(drop, 0).mul_(ctx.scale)  # (x * a bool mask takes a slow type-promotion path)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0).mul_(ctx.scale), None


_last = threading.local()  # the last input dropped: (weakref to it, its version, p, grad mode, the dropped tensor)


def _dropout(module, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """What peft's ``lora_dropout[name]`` does to ``x``, through :class:`_Dropout` when ``fast`` and it is a
    training-mode ``nn.Dropout`` on a CPU tensor. The adapters that read the same input tensor one after
    the other (q, k and v; gate and up) get the same dropped input, as one adapter on a fused qkv or
    gate_up projection (Phi-3, Phi-4) does: each adapter's dropout is the same in distribution, the draws,
    the masked copies and their backward are done once (autograd adds the adapters' gradients first)."""
    if not (fast and isinstance(module, torch.nn.Dropout) and module.training and 0 < module.p < 1
            and x.device.type == "cpu"):
        return module(x)
    key = (x._version, module.p, torch.is_grad_enabled())
    last = getattr(_last, "v", None)
    if last is not None and last[0]() is x and last[1:4] == key:
        return last[4]
    out = _Dropout.apply(x, module.p)
    # held strongly until the next input: a checkpointed layer's no-grad forward and its recompute then draw alike
    _last.v = (weakref.ref(x), *key, out)
    return out


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(a in self.lora_variant for a in self.active_adapters)):
        return self._duet_peft_forward(x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    added = False
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name], self.lora_B[name]
        with torch.autocast(x.device.type, enabled=False):
            delta = b(a(_dropout(self.lora_dropout[name], x.float(), self._duet_fast_dropout))) * self.scaling[name]
            result = (result if added else result.float()) + delta
        added = True
    if not torch.is_autocast_enabled(x.device.type):
        return result.to(out_dtype)  # no autocast to cast the next layer's input: peft's dtype contract
    return result


def install(model, fast_dropout: bool = True) -> int:
    """Give every vanilla peft LoRA ``Linear`` in ``model`` the fp32-update forward (idempotent): those whose
    adapter weights are fp32, as peft keeps them by default; ``fast_dropout``: LoRA dropout through
    :class:`_Dropout` (else torch's). Returns how many layers now use it (0 when the model has no such layer or peft is missing)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if type(m) is not Linear:  # quantized and other LoRA layer types keep peft's forward
            continue
        if any(p.dtype != torch.float32 for p in list(m.lora_A.parameters()) + list(m.lora_B.parameters())):
            continue  # an adapter kept in bf16 (autocast_adapter_dtype=False) stays as peft runs it
        if not hasattr(m, "_duet_peft_forward"):
            m._duet_peft_forward, m._duet_peft_forward_was_own = m.forward, "forward" in vars(m)
            m.forward = types.MethodType(_forward, m)
        m._duet_fast_dropout = fast_dropout
        n += 1
    return n


def uninstall(model) -> None:
    """Give every layer :func:`install` touched its peft forward back."""
    for m in model.modules():
        if hasattr(m, "_duet_peft_forward"):
            del m.forward  # the instance attribute: the class's forward (or what was there before) shows again
            if m._duet_peft_forward_was_own:
                m.forward = m._duet_peft_forward
            del m._duet_peft_forward, m._duet_peft_forward_was_own, m._duet_fast_dropout
