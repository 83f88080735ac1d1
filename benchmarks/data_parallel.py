"""One run over 1 vs 2 data-parallel workers (Ray Train, gloo on CPU) on this machine: tokens/s.

    python -m benchmarks.data_parallel [--reps 3] [--steps 120] [--model tiny|smollm2]

Real runs through `duet run` on the embedded cluster (`duet up`), the demo preset on a chat dataset
of distinct short examples, the same global batch for both arms: 1 worker x micro-batch 4 (torch
with every core) against 2 workers x micro-batch 2 (the cores split between them). Arms alternate,
each repetition a fresh run. The figure is the training throughput the run records (tokens of every
worker / training seconds), and its ratio 2 workers / 1 worker: on a machine whose cores the two
workers share, what the ratio lacks of 1.0 is what the coordination costs (gradient all-reduce over
gloo, the group's start-up is outside the training seconds). On a multi-GPU host each worker brings a
GPU of its own and the ratio is the scaling.

Writes benchmarks/results/data_parallel-<machine>.json (data_parallel-<model>-<machine>.json for another model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_machine, versions

REPO = Path(__file__).resolve().parents[1]


def duet(*args, env) -> str:
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=3600, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"duet {' '.join(map(str, args))}: {r.stderr[-2000:]}")
    return r.stdout


def dataset(path: Path, n: int = 480) -> Path:
    rows = []
    for i in range(n):
        a, b = random.Random(i).randint(1, 9999), random.Random(i + 7).randint(1, 9999)
        rows.append({"id": f"sum-{i:03d}", "messages": [
            {"role": "user", "content": f"What is {a} plus {b}? Show the sum and nothing else, please."},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}], "metadata": {"category": "facts"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--model", default="tiny")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-dp-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DUET_TORCH_THREADS")}
    env.update(PYTHONPATH=str(REPO), DUET_CONFIG_DIR=str(tmp / "config"), HF_HUB_OFFLINE="1")
    ws, data = tmp / "ws", dataset(tmp / "sums.jsonl")
    arms = {"1_worker": {"workers": 1, "micro_batch": 4}, "2_workers": {"workers": 2, "micro_batch": 2}}
    out: dict[str, list[dict]] = {k: [] for k in arms}
    duet("up", "--workspace", ws, env=env)
    try:
        for rep in range(a.reps):
            for arm, ov in (arms.items() if rep % 2 == 0 else reversed(list(arms.items()))):
                cfg = tmp / f"{arm}.yaml"
                cfg.write_text(json.dumps({"preset": "demo", "model": a.model, "data": [str(data)], "dataset": "sums",
                                           "overrides": {**ov, "max_steps": a.steps, "checkpoint_every": a.steps,
                                                         "eval_every": a.steps, "sample_prompts": 1,
                                                         "max_new_tokens": 4, "grad_accum": 1}}))
                run_id = json.loads(duet("run", cfg, "--workspace", ws, "--json", env=env))["run_id"]
                rec = json.loads((ws / ".duet" / "executor" / "runs" / run_id / "run.json").read_text())
                if rec["status"] != "finished":
                    raise RuntimeError(f"{arm}: {rec['status']} {rec.get('error')}")
                out[arm].append({"run_id": run_id, "tokens_per_s": rec["tokens_per_s"], "train_s": rec["train_s"],
                                 "tokens": rec["tokens"], "world_size": rec.get("world_size", 1),
                                 "dtype": rec["config"]["dtype"]})
                print(arm, out[arm][-1], flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--workspace", str(ws)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in out.items()}
    ratios = [b["tokens_per_s"] / o["tokens_per_s"] for o, b in zip(out["1_worker"], out["2_workers"])]
    doc = {"benchmark": "data_parallel", "machine": cpu_machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "versions": versions("torch", "transformers", "trl", "ray"), "model": a.model, "steps": a.steps,
           "global_batch": 4, "arms": arms, "reps": out, "median_tokens_per_s": med,
           "ratio_2_over_1": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                              "max": round(max(ratios), 3), "reps": [round(r, 3) for r in ratios]},
           "how": "duet run on `duet up` (embedded), alternating arms; tokens/s = every worker's tokens / training "
                  "seconds, as run.json records it; both arms use all of this machine's cores"}
    name = "data_parallel" if a.model == "tiny" else f"data_parallel-{a.model}"
    path = REPO / "benchmarks" / "results" / f"{name}-{cpu_machine()}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_tokens_per_s", "ratio_2_over_1")}, indent=2))
    return doc


if __name__ == "__main__":
    main()
