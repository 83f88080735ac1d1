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
"""

from __future__ import annotations

import types

import torch


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
            delta = b(a(self.lora_dropout[name](x.float()))) * self.scaling[name]
            result = (result if added else result.float()) + delta
        added = True
    if not torch.is_autocast_enabled(x.device.type):
        return result.to(out_dtype)  # no autocast to cast the next layer's input: peft's dtype contract
    return result


def install(model) -> int:
    """Give every vanilla peft LoRA ``Linear`` in ``model`` the fp32-update forward (idempotent): those whose
    adapter weights are fp32, as peft keeps them by default. Returns how many layers now use it (0 when the model has no such layer or peft is missing)."""
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
        n += 1
    return n


def uninstall(model) -> None:
    """Give every layer :func:`install` touched its peft forward back."""
    for m in model.modules():
        if hasattr(m, "_duet_peft_forward"):
            del m.forward  # the instance attribute: the class's forward (or what was there before) shows again
            if m._duet_peft_forward_was_own:
                m.forward = m._duet_peft_forward
            del m._duet_peft_forward, m._duet_peft_forward_was_own
