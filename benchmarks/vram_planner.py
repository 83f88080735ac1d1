"""The planner's memory estimate vs the measured peak, config by config.

    python -m benchmarks.vram_planner                 # on a CUDA machine: vs torch.cuda.max_memory_reserved()
    python -m benchmarks.vram_planner --device cpu    # here: vs the process's peak RSS growth (rougher)

Each config builds a Qwen2-shaped model from a config (random init: memory does not depend on the
values), wraps it in PEFT LoRA (QLoRA: bitsandbytes 4-bit nf4 with double quantization, via
prepare_model_for_kbit_training), and runs a few real AdamW steps on random tokens at the
planned micro-batch and sequence length. Writes ``benchmarks/results/vram_planner-<machine>.json``.
Goal (issue 3/8): the estimate within 10 % of the measurement, and no plan marked "fits" OOMs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

SIZES = {  # Qwen2-shaped configs (hidden, layers, intermediate, heads, kv heads, vocab)
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
}
GPU_CONFIGS = [  # (size, method, micro_batch, seq_len, gradient checkpointing)
    ("0.5B", "lora", 4, 1024, False), ("0.5B", "qlora", 4, 1024, False), ("0.5B", "lora", 8, 2048, True),
    ("1.5B", "lora", 4, 1024, False), ("1.5B", "qlora", 4, 1024, False), ("1.5B", "qlora", 8, 2048, True),
    ("1.5B", "lora", 2, 4096, True),
]
CPU_CONFIGS = [("tiny", "lora", 4, 256, False), ("tiny", "lora", 8, 256, False), ("tiny", "lora", 4, 512, True)]


def measure(size: str, method: str, mb: int, seq: int, gc_on: bool, device: str, steps: int = 3) -> dict:
    import psutil
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from training.plan import ModelProfile, TrainConfig, make_plan

    cfg_dict = {**SIZES[size], "model_type": "qwen2"}
    tc = TrainConfig(name="bench", method=method, micro_batch=mb, grad_accum=1, seq_len=seq, max_steps=10,
                     warmup_steps=0, gradient_checkpointing=gc_on,
                     lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"})
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    plan = make_plan(tc, ModelProfile.from_config(cfg_dict), device=device, bf16=bf16, budget_bytes=1 << 50)
    est = plan.to_dict()["estimate"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    rss0 = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    hf_cfg = Qwen2Config(**SIZES[size])
    t0 = time.time()
    oom = False
    try:
        if method == "qlora":
            from transformers import BitsAndBytesConfig

            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
            # from_config cannot quantize: save a random model once and load it 4-bit.
            tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"duet-bench-{size}"
            if not (tmp / "config.json").exists():
                Qwen2ForCausalLM(hf_cfg).to(dtype).save_pretrained(tmp)
            model = Qwen2ForCausalLM.from_pretrained(tmp, quantization_config=q, dtype=dtype, device_map={"": 0})
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc_on)
        else:
            with torch.device(device):
                model = Qwen2ForCausalLM(hf_cfg).to(dtype)
            if gc_on:
                model.gradient_checkpointing_enable()
                model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        peak_rss = 0
        for _ in range(steps):
            ids = torch.randint(0, hf_cfg.vocab_size, (mb, seq), device=device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
    except torch.OutOfMemoryError:
        oom = True
    measured = (torch.cuda.max_memory_reserved() if device == "cuda" else peak_rss - rss0) if not oom else None
    out = {"size": size, "method": method, "micro_batch": mb, "seq_len": seq, "gradient_checkpointing": gc_on,
           "estimate_bytes": est["torch_reserved_bytes"] if device == "cuda" else est["total_bytes"] - est["breakdown_bytes"].get("overhead", 0),
           "estimate_breakdown_bytes": est["breakdown_bytes"], "measured_bytes": measured,
           "measured_as": "torch.cuda.max_memory_reserved()" if device == "cuda" else "peak RSS growth during the steps",
           "oom": oom, "seconds": round(time.time() - t0, 1)}
    if measured:
        out["ratio_estimate_to_measured"] = round(out["estimate_bytes"] / measured, 3)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # size,method,mb,seq,gc: one config in this process
    a = ap.parse_args(argv)
    import torch

    if a.one:
        size, method, mb, seq, gc_on = a.one.split(",")
        print(json.dumps(measure(size, method, int(mb), int(seq), gc_on == "1", a.device)))
        return 0

    if a.device == "cuda" and not torch.cuda.is_available():
        print("vram_planner: no CUDA device here; run it on a GPU host, or pass --device cpu for the rough CPU check",
              file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name(0) if a.device == "cuda" else f"cpu-{platform.machine()}-{os.cpu_count()}c"
    rows = []
    for size, method, mb, seq, gc_on in (GPU_CONFIGS if a.device == "cuda" else CPU_CONFIGS):
        if method == "qlora" and a.device != "cuda":
            continue
        # one process a config: the allocator's caches and RSS start clean each time
        import subprocess

        r = subprocess.run([sys.executable, "-m", "benchmarks.vram_planner", "--device", a.device, "--one",
                            f"{size},{method},{mb},{seq},{int(gc_on)}"], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    ok = [r for r in rows if r.get("ratio_estimate_to_measured")]
    doc = {"benchmark": "vram_planner", "machine": machine, "host": socket.gethostname(), "device": a.device,
           "versions": {"torch": torch.__version__}, "rows": rows,
           "within_10_percent": sum(abs(r["ratio_estimate_to_measured"] - 1) <= 0.10 for r in ok),
           "configs": len(rows), "ooms": sum(r["oom"] for r in rows)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = machine.lower().replace(" ", "-")
    (out / f"vram_planner-{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / f'vram_planner-{name}.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
