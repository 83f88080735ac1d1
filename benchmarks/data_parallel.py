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

Side by side, the script a user would write instead (benchmarks/plain_trl.py: TRL's SFTTrainer + PEFT)
with the same plan (model, data split, LoRA, dtype, hyper-parameters) and, on CPU, duet's CPU kernels
installed in it (``--duet-cpu``: the loss head and the fp32 LoRA update): so this arm is TRL with duet's
kernels, not a script with nothing of duet's, and the losses compare kernel for kernel; as one process with micro-batch 4 and under ``torchrun --nproc_per_node 2`` with micro-batch 2
(plain DDP over gloo, one torch thread a process as duet's workers have). Reported: tokens/s and median
step seconds of each, duet / plain for each arm, and the largest per-step loss difference between
each duet arm and its plain counterpart (LoRA dropout is 0 in every arm, so the losses compare: in fp32,
``--dtype fp32``, they are equal).

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

from benchmarks import cpu_features, cpu_machine, versions

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


def median_step_s(times: list[float], warmup: int = 5) -> float:
    """Median seconds an optimizer step after the warm-up steps (both sides stamp steps in on_log)."""
    gaps = [b - a for a, b in zip(times, times[1:])][warmup:]
    return statistics.median(gaps)


def plain_arm(rec: dict, run_dir: Path, out: Path, procs: int, micro_batch: int, steps: int, env: dict) -> dict:
    """The plain TRL script with the duet run's plan, over ``procs`` processes (torchrun when > 1)."""
    from benchmarks.trl_compare import plan_as_sft_config

    plan = rec["config"]
    lo = plan["train"]["lora"]
    cfg = plan_as_sft_config(plan, max_steps=steps, per_device_train_batch_size=micro_batch,
                             save_strategy="no", eval_strategy="no")
    lora = {"r": lo["r"], "lora_alpha": lo["alpha"], "lora_dropout": lo["dropout"], "target_modules": lo["target_modules"]}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 \
        else [sys.executable]
    cmd = launcher + ["-m", "benchmarks.plain_trl", "--model", rec["model_path"], "--train", str(run_dir / "dataset" / "train.jsonl"),
                      "--test", str(run_dir / "dataset" / "test.jsonl"), "--out", str(out), "--config", json.dumps(cfg),
                      "--lora", json.dumps(lora), "--dtype", "bf16" if plan["dtype"] == "bf16" else "fp32"] + \
        (["--duet-cpu"] if plan["device"] == "cpu" else [])
    threads = max(1, (os.cpu_count() or 1) // procs)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600,
                       env={**env, "DUET_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        raise RuntimeError(f"plain TRL over {procs} process(es): {r.stderr[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    times = [0.0] + list(__import__("itertools").accumulate(res["step_times_s"]))
    return {"tokens_per_s": round(res["tokens_per_s"], 1), "train_s": round(res["train_wall_s"], 2),
            "tokens": res["tokens_non_padding"], "world_size": res["world_size"], "step_s": round(median_step_s(times), 4),
            "losses": {int(k): v for k, v in res["losses"].items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default=None, help="the plan's dtype (default: the preset's; fp32 to compare losses exactly)")
    ap.add_argument("--out", default=None, help="where the JSON goes (default benchmarks/results/...)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain TRL / torchrun arms")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-dp-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DUET_TORCH_THREADS")}
    env.update(PYTHONPATH=str(REPO), DUET_CONFIG_DIR=str(tmp / "config"), HF_HUB_OFFLINE="1")
    ws, data = tmp / "ws", dataset(tmp / "sums.jsonl")
    arms = {"1_worker": {"workers": 1, "micro_batch": 4}, "2_workers": {"workers": 2, "micro_batch": 2}}
    out: dict[str, list[dict]] = {k: [] for k in arms}
    plain: dict[str, list[dict]] = {"1_process": [], "2_processes_torchrun": []}
    loss_diffs = []
    duet("up", "--workspace", ws, env=env)
    try:
        for rep in range(a.reps):
            for arm, ov in (arms.items() if rep % 2 == 0 else reversed(list(arms.items()))):
                cfg = tmp / f"{arm}.yaml"
                cfg.write_text(json.dumps({"preset": "demo", "model": a.model, "data": [str(data)], "dataset": "sums",
                                           "overrides": {**ov, "max_steps": a.steps, "checkpoint_every": a.steps,
                                                         "eval_every": a.steps, "sample_prompts": 1,
                                                         "max_new_tokens": 4, "grad_accum": 1, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                                                         **({"dtype": a.dtype} if a.dtype else {})}}))
                run_id = json.loads(duet("run", cfg, "--workspace", ws, "--json", env=env))["run_id"]
                run_dir = ws / ".duet" / "executor" / "runs" / run_id
                rec = json.loads((run_dir / "run.json").read_text())
                if rec["status"] != "finished":
                    raise RuntimeError(f"{arm}: {rec['status']} {rec.get('error')}")
                out[arm].append({"run_id": run_id, "tokens_per_s": rec["tokens_per_s"], "train_s": rec["train_s"],
                                 "tokens": rec["tokens"], "world_size": rec.get("world_size", 1),
                                 "dtype": rec["config"]["dtype"],
                                 "step_s": round(median_step_s([x["time"] for x in sorted(rec["losses"], key=lambda x: x["step"])]), 4)})
                print(arm, out[arm][-1], flush=True)
                if a.no_plain:
                    continue
                name, procs = ("1_process", 1) if ov["workers"] == 1 else ("2_processes_torchrun", 2)
                row = plain_arm(rec, run_dir, tmp / f"plain-{name}-{rep}", procs, ov["micro_batch"], a.steps, env)
                mine = {x["step"]: x["loss"] for x in rec["losses"]}
                row["max_loss_diff_vs_duet"] = max(abs(mine[k] - v) for k, v in row.pop("losses").items() if k in mine)
                plain[name].append(row)
                print("plain", name, row, flush=True)
    finally:
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--workspace", str(ws)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in out.items()}
    ratios = [b["tokens_per_s"] / o["tokens_per_s"] for o, b in zip(out["1_worker"], out["2_workers"])]
    side = None
    if not a.no_plain:
        pmed = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in plain.items()}
        pratios = [b["tokens_per_s"] / o["tokens_per_s"] for o, b in zip(plain["1_process"], plain["2_processes_torchrun"])]
        pair = {"1_worker": "1_process", "2_workers": "2_processes_torchrun"}
        side = {"script": "benchmarks/plain_trl.py (1 process; torchrun --nproc_per_node 2 for 2)", "reps": plain,
                "median_tokens_per_s": pmed,
                "ratio_2_over_1": {"median": round(statistics.median(pratios), 3), "reps": [round(r, 3) for r in pratios]},
                "duet_over_plain_tokens_per_s": {arm: round(med[arm] / pmed[pair[arm]], 3) for arm in arms},
                "duet_over_plain_step_s": {arm: round(statistics.median(x["step_s"] for x in out[arm])
                                                     / statistics.median(x["step_s"] for x in plain[pair[arm]]), 3)
                                           for arm in arms},
                "max_loss_diff_vs_duet": {k: max(x["max_loss_diff_vs_duet"] for x in v) for k, v in plain.items()}}
    doc = {"benchmark": "data_parallel", "machine": cpu_machine(), "cpu": cpu_features(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "versions": versions("torch", "transformers", "trl", "ray"), "model": a.model, "dtype": a.dtype, "steps": a.steps,
           "global_batch": 4, "arms": arms, "reps": out, "median_tokens_per_s": med,
           "ratio_2_over_1": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                              "max": round(max(ratios), 3), "reps": [round(r, 3) for r in ratios]},
           "plain_trl": side,
           "how": "duet run on `duet up` (embedded), alternating arms; tokens/s = every worker's tokens / training "
                  "seconds, as run.json records it; both arms use all of this machine's cores"}
    name = "data_parallel" if a.model == "tiny" else f"data_parallel-{a.model}"
    path = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"{name}-{cpu_machine()}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_tokens_per_s", "ratio_2_over_1")}, indent=2))
    if side:
        print(json.dumps({k: side[k] for k in ("median_tokens_per_s", "ratio_2_over_1", "duet_over_plain_tokens_per_s",
                                               "duet_over_plain_step_s", "max_loss_diff_vs_duet")}, indent=2))
    return doc


if __name__ == "__main__":
    main()
