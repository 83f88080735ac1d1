"""One LoRA training step in the main thread and in a background thread of the same process.

    python -m benchmarks.thread_step [--reps 7] [--dropout 0.05]

duet's executor trained each run in a background thread of the actor until issue 37 (it now trains each
run in the main thread of a process of the run's own, training/run/solo.py). On the 2-core development
machine a step in the thread was slower than the same step in a plain script's main thread
(benchmarks/trl_compare.py's overhead_ratio); this measures only that: SmolLM2-135M in bf16 with LoRA r 16 on every linear layer, duet's fp32 LoRA update
(training/run/cpu_lora.py) (``--dtype fp32``: fp32 weights, no autocast, peft's forward; written to
thread_step-<machine>-fp32.json), a 4 x 256 batch, forward and backward under bf16 autocast, no trainer. The two
alternate, ``--reps`` times, 2 timed steps each after one untimed. CPU time per step is reported
beside wall time: equal CPU time with a longer wall means the cores sat idle. A third arm,
``thread_set``, is a background thread that calls torch.set_num_threads itself first. It tests
whether OpenMP's per-thread count explains the gap. Measured on the development machine: it does
not (1.41x vs 1.30x, equal CPU seconds). Writes benchmarks/results/thread_step-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_machine, versions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.run import cpu_lora

    from training import models

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(str(models.resolve("smollm2")), dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=a.dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if a.dtype == "bf16":
        cpu_lora.install(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()

    rows = {"main": [], "thread": [], "thread_set": []}

    def timed(where):
        if where == "thread_set":  # the count set in this thread too: does OpenMP's per-thread count explain the gap?
            torch.set_num_threads(a.threads)
        step()
        w, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(2):
            step()
        rows[where].append({"wall_s": (time.perf_counter() - w) / 2, "process_cpu_s": (time.process_time() - cpu0) / 2})

    for _ in range(a.reps):
        timed("main")
        for where in ("thread", "thread_set"):
            t = threading.Thread(target=timed, args=(where,))
            t.start()
            t.join()
    med = lambda where, k: statistics.median(r[k] for r in rows[where])  # noqa: E731
    ratios = [t["wall_s"] / m["wall_s"] for m, t in zip(rows["main"], rows["thread"])]
    ratios_set = [t["wall_s"] / m["wall_s"] for m, t in zip(rows["main"], rows["thread_set"])]
    machine = cpu_machine()
    doc = {"benchmark": "thread_step", "machine": machine, "cpu": cpu_features(),
           "versions": versions("torch", "transformers", "peft"),
           "threads": a.threads, "dtype": a.dtype, "dropout": a.dropout, "batch": [4, 256], "reps": rows,
           "median_wall_s": {w: round(med(w, "wall_s"), 3) for w in rows},
           "median_process_cpu_s": {w: round(med(w, "process_cpu_s"), 3) for w in rows},
           "thread_over_main": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                                "max": round(max(ratios), 3), "reps": [round(r, 3) for r in ratios]},
           "thread_set_over_main": {"median": round(statistics.median(ratios_set), 3), "min": round(min(ratios_set), 3),
                                    "max": round(max(ratios_set), 3), "reps": [round(r, 3) for r in ratios_set]}}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"thread_step-{machine}{'' if a.dtype == 'bf16' else '-fp32'}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_wall_s", "median_process_cpu_s", "thread_over_main",
                                          "thread_set_over_main")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
