"""The planner's memory estimate vs the measured peak, config by config.

    python -m benchmarks.vram_planner                 # on a CUDA machine: vs torch.cuda.max_memory_reserved()
    python -m benchmarks.vram_planner --device cpu    # here: vs the process's peak RSS growth (rougher)

Each config builds a Qwen2-shaped model from a config (random init: memory does not depend on the
values) and trains it a few steps through duet's own training path (training.run.engine's
load_train_model and build_trainer: PEFT LoRA or QLoRA, TRL's SFTTrainer with its fused LM-head
loss) on random tokens filling every row at the planned micro-batch and sequence length. Writes ``benchmarks/results/vram_planner-<machine>.json``.
Goal (issue 3/8): the estimate within 10 % of the measurement. Each plan is made against this machine's
real budget (the GPU's memory; the RAM available here) and its verdict is recorded beside the outcome.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_kind, cpu_machine

SIZES = {  # Qwen2-shaped configs (hidden, layers, intermediate, heads, kv heads, vocab)
    "0.5B": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # Llama-3.1-8B's shape (128k vocabulary, untied head), as a Qwen2 config: 4-bit only
    "8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=768, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    # SmolLM2-135M's shape (Llama-like, 49k vocabulary), as a Qwen2 config
    "small": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
GPU_CONFIGS = [  # (size, method, micro_batch, seq_len, gradient checkpointing, kind: sft | dpo | packed)
    ("0.5B", "lora", 4, 1024, False, "sft"), ("0.5B", "qlora", 4, 1024, False, "sft"),
    ("0.5B", "lora", 8, 2048, True, "sft"), ("1.5B", "lora", 4, 1024, False, "sft"),
    ("1.5B", "qlora", 4, 1024, False, "sft"), ("1.5B", "qlora", 8, 2048, True, "sft"),
    ("1.5B", "lora", 2, 4096, True, "sft"), ("8B", "qlora", 2, 2048, True, "sft"),
    ("0.5B", "lora", 2, 1024, False, "dpo"), ("0.5B", "lora", 4, 2048, False, "packed"),
    ("1.5B", "qlora", 2, 1024, False, "dpo"), ("8B", "qlora", 1, 1024, True, "dpo"),  # last: the longest
    ("8B", "lora", 1, 1024, True, "sft"),  # bf16 LoRA of an 8B: 16 GB of weights, an 80 GB card
]
CPU_CONFIGS = [("tiny", "lora", 4, 256, False, "sft"), ("tiny", "lora", 8, 256, False, "sft"),
               ("tiny", "lora", 4, 512, True, "sft"), ("tiny", "lora", 2, 2048, False, "sft"),
               ("tiny", "lora", 2, 2048, True, "sft"), ("tiny", "lora", 4, 1024, False, "packed"),
               ("tiny", "lora", 2, 512, False, "dpo"), ("small", "lora", 4, 256, False, "sft"),
               ("small", "lora", 4, 512, False, "sft"), ("small", "lora", 2, 1024, False, "sft"),
               ("small", "qlora", 4, 256, False, "sft"), ("small", "lora", 8, 512, True, "sft"),
               ("small", "lora", 2, 256, False, "dpo"), ("small", "lora", 4, 512, False, "packed")]
PACKED_ROW = 4  # a packed config's examples are seq_len / 4 tokens: four to a packed row


def _model_folder(size: str, dtype) -> Path:
    """A random-initialised model of ``size`` saved once (memory does not depend on the values), so it
    loads the way the engine loads a user's model (from_pretrained, 4-bit for QLoRA)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"duet-bench-{size}-{str(dtype).split('.')[-1]}"
    if not (tmp / "config.json").exists():
        import torch

        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # an 8B initialises in seconds on a GPU
            model = Qwen2ForCausalLM(Qwen2Config(**SIZES[size])).to(dtype)
        model.save_pretrained(tmp)
        del model
    return tmp


def _rows(kind: str, tok, vocab: int, mb: int, seq: int, steps: int, g) -> list[dict]:
    """Random data that fills every planned row: token rows of seq_len (SFT); rows of seq_len / 4 that
    the packer joins four to a row (packed); DPO pairs whose prompt + answer exceed seq_len, as text
    (TRL's DPOTrainer tokenizes its data itself), so chosen and rejected are both cut to seq_len."""
    import torch

    if kind == "sft":
        return [{"input_ids": torch.randint(0, vocab, (seq,), generator=g).tolist()} for _ in range(mb * (steps + 1))]
    if kind == "packed":
        return [{"input_ids": torch.randint(0, vocab, (seq // PACKED_ROW,), generator=g).tolist()}
                for _ in range(mb * PACKED_ROW * (steps + 1))]
    top = min(vocab, len(tok)) - 1
    text = lambda n: tok.decode(torch.randint(100, top, (n,), generator=g).tolist())  # noqa: E731
    return [{"prompt": text(seq // 2), "chosen": text(seq), "rejected": text(seq)} for _ in range(mb * (steps + 1))]


def measure(size: str, method: str, mb: int, seq: int, gc_on: bool, device: str, steps: int = 3,
            kind: str = "sft") -> dict:
    """One config through duet's own training path (training.run.engine.load_train_model + build_trainer:
    TRL's SFTTrainer or DPOTrainer with its fused LM-head loss), on random data filling every row."""
    import tempfile

    import psutil
    import torch
    from datasets import Dataset

    from training import models
    from training.run.model_load import build_trainer, load_train_model
    from training.plan.hardware import bf16_native, cpu_bf16
    from training.run.phases import PhasePeaks, peak_rss, reset_peak_rss
    from training.plan.memory_model import ModelProfile
    from training.config import TrainConfig
    from training.plan.planner import make_plan

    cfg_dict = {**SIZES[size], "model_type": "qwen2"}
    tc = TrainConfig(name="bench", method=method, micro_batch=mb, grad_accum=1, seq_len=seq, max_steps=10,
                     warmup_steps=0, gradient_checkpointing=gc_on, packing=kind == "packed",
                     phase="dpo" if kind == "dpo" else "sft",
                     lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"})
    if device == "cuda":
        bf16 = bf16_native("{}.{}".format(*torch.cuda.get_device_capability(0)))
        budget = torch.cuda.mem_get_info(0)[1]
    else:  # the CPU path duet plans here: bf16 where the CPU has it natively (training.plan.hardware.cpu_bf16)
        bf16, budget = cpu_bf16()["native"], psutil.virtual_memory().available
    plan = make_plan(tc, ModelProfile.from_config(cfg_dict), device=device, bf16=bf16, budget_bytes=budget)
    pd = plan.to_dict()
    est = pd["estimate"]
    dtype = torch.bfloat16 if pd["dtype"] == "bf16" else torch.float32
    folder = _model_folder(size, dtype)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(models.tiny_folder())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_list(_rows(kind, tok, SIZES[size]["vocab_size"], mb, seq, steps, g))
    cfg = plan.config  # the plan's resolved TrainConfig, as the engine trains it
    import peft  # noqa: F401  (the libraries' own memory is not the plan's: import them before rss0)
    import trl  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    gc.collect()
    peaks = PhasePeaks(interval=0.01).start()
    rss0 = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    oom, hwm = False, None
    try:
        peaks.enter("load")
        model = load_train_model(folder, cfg, device=device, dtype=pd["dtype"])
        if device == "cuda" and method != "qlora":
            model.to("cuda")
        with tempfile.TemporaryDirectory() as out:
            trainer = build_trainer(model, tok, cfg, phase=tc.phase, device=device, dtype=pd["dtype"], out=Path(out),
                                    max_steps=steps, evaluate=False, save=False, train_ds=ds, eval_ds=None)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            peaks.enter("training")
            exact = reset_peak_rss()
            trainer.train()
            hwm = peak_rss() if exact else None
            cuda_peak = torch.cuda.max_memory_reserved() if device == "cuda" else None
            peaks.enter("done")
    except torch.OutOfMemoryError:
        oom = True
    got = peaks.stop()
    if oom:
        measured = None
    elif device == "cuda":
        measured = cuda_peak
    else:
        measured = got["training"]["rss_bytes"] - rss0
    out = {"size": size, "method": method, "micro_batch": mb, "seq_len": seq, "gradient_checkpointing": gc_on,
           "kind": kind, "path": f"training.run.engine.build_trainer (TRL {'DPO' if kind == 'dpo' else 'SFT'}Trainer, "
                                 "fused LM-head loss)",
           "estimate_bytes": est["torch_reserved_bytes"] if device == "cuda" else est["total_bytes"] - est["breakdown_bytes"].get("overhead", 0),
           "estimate_breakdown_bytes": est["breakdown_bytes"], "measured_bytes": measured,
           "measured_as": ("torch.cuda.max_memory_reserved() during trainer.train()" if device == "cuda" else
                           "peak RSS (sampled every 10 ms) during trainer.train(), minus RSS before the model load"),
           "oom": oom, "seconds": round(time.time() - t0, 1), "dtype": pd["dtype"], "budget_bytes": budget,
           "fits": est["fits"]}
    if device != "cuda" and not oom and hwm is not None:  # the exact peak, transients shorter than a sample included
        out["hwm_bytes"] = hwm - rss0
        out["ratio_estimate_to_hwm"] = round(out["estimate_bytes"] / out["hwm_bytes"], 3)
    if measured:
        out["ratio_estimate_to_measured"] = round(out["estimate_bytes"] / measured, 3)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # size,method,mb,seq,gc,kind: one config in this process
    a = ap.parse_args(argv)
    import torch

    if a.one:
        size, method, mb, seq, gc_on, kind = a.one.split(",")
        print(json.dumps(measure(size, method, int(mb), int(seq), gc_on == "1", a.device, kind=kind)))
        return 0

    if a.device == "cuda" and not torch.cuda.is_available():
        print("vram_planner: no CUDA device here; run it on a GPU host, or pass --device cpu for the rough CPU check",
              file=sys.stderr)
        return 2
    machine = torch.cuda.get_device_name(0) if a.device == "cuda" else cpu_machine()
    rows = []
    for size, method, mb, seq, gc_on, kind in (GPU_CONFIGS if a.device == "cuda" else CPU_CONFIGS):
        # one process a config: the allocator's caches and RSS start clean each time
        import subprocess

        r = subprocess.run([sys.executable, "-m", "benchmarks.vram_planner", "--device", a.device, "--one",
                            f"{size},{method},{mb},{seq},{int(gc_on)},{kind}"], capture_output=True, text=True)
        if r.returncode != 0:  # recorded, not skipped: a config that cannot run is a finding
            print(r.stderr[-2000:], file=sys.stderr)
            row = {"size": size, "method": method, "micro_batch": mb, "seq_len": seq, "gradient_checkpointing": gc_on,
                   "kind": kind, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
        else:
            row = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(rows, machine, a)  # after every config: a run cut short by its time limit keeps what it measured
    return 0


def write(rows: list[dict], machine: str, a) -> Path:
    import torch

    ok = [r for r in rows if r.get("ratio_estimate_to_measured")]
    doc = {"benchmark": "vram_planner", "machine": machine, "cpu": cpu_features(), "host": socket.gethostname(), "device": a.device,
           "versions": {"torch": torch.__version__}, "rows": rows,
           "within_10_percent": sum(abs(r["ratio_estimate_to_measured"] - 1) <= 0.10 for r in ok),
           "configs": len(rows), "ooms": sum(bool(r.get("oom")) for r in rows),
           "errors": sum("error" in r for r in rows)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = machine.lower().replace(" ", "-")
    if a.device == "cpu":  # the dtype a CPU plan trains in follows the CPU's kind (benchmarks.cpu_kind)
        name += f"-{cpu_kind()}"
    path = out / f"vram_planner-{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
