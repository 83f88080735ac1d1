"""The script a user would write instead of duet: TRL's SFTTrainer + PEFT LoRA, nothing of duet's (unless
``--duet-cpu``, below: then it is TRL with duet's CPU kernels, and a result must say so).

    python -m benchmarks.plain_trl --model DIR --train train.jsonl --test test.jsonl --out DIR \
        [--config '{"per_device_train_batch_size": 4, ...}']

``--config`` carries the SFTConfig fields beyond the basics (use_cpu off a GPU). ``--dtype bf16`` loads
the base in bf16 and trains under bf16 autocast (fp32 LoRA parameters, as duet's plan does);
``--duet-cpu`` routes TRL's CPU loss head through training/run/fast_loss.py and adds LoRA's update in fp32
(training/run/cpu_lora.py) as duet's executor does on a CPU, so the script can run the exact configuration duet's executor runs (benchmarks/trl_compare.py measures the executor's overhead
that way). The LoRA settings come from ``--lora``. A minimal callback stamps every logged optimizer step the way duet's
executor stamps losses.jsonl (time.time() in on_log), so step times compare; results go to
``OUT/result.json`` (rank 0's, under ``torchrun --nproc_per_node N``: plain DDP over gloo or NCCL): step times, per-step losses, non-padding tokens seen, tokens/s, peak RSS (of the whole process,
which includes loading the model, and sampled every 20 ms during ``train()`` only), and the final eval
loss measured the same way whatever the training config (unpacked, batch 8, max_length 1024, the TRL
defaults), so two configs' losses compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path


class RssPeak:
    """Peak resident memory of this process while the block runs (sampled; ru_maxrss cannot be reset)."""

    def __init__(self, every_s: float = 0.02):
        import psutil

        self.proc, self.every_s, self.peak = psutil.Process(), every_s, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--duet-cpu", action="store_true")
    ap.add_argument("--lora", default='{"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}')
    a = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(int(os.environ.get("DUET_TORCH_THREADS", "2")))
    rows = lambda p: Dataset.from_list([{"messages": json.loads(x)["messages"]}  # noqa: E731
                                        for x in Path(p).read_text().splitlines() if x.strip()])
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    if a.duet_cpu:
        from training.run import fast_loss

        fast_loss.install()
    extra = json.loads(a.config)
    base = {"output_dir": a.out, "use_cpu": not torch.cuda.is_available(), "bf16": a.dtype == "bf16",
            "report_to": [], "disable_tqdm": True, "logging_steps": 1, "include_num_input_tokens_seen": "non_padding"}
    args = SFTConfig(**{**base, **extra})

    marks: list[tuple[int, float, int]] = []
    losses: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # as training.run.engine stamps losses.jsonl
            if logs and "loss" in logs:
                marks.append((state.global_step, time.time(), int(state.num_input_tokens_seen or 0)))
                losses[state.global_step] = float(logs["loss"])

    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(a.train), eval_dataset=rows(a.test),
                         processing_class=tok, peft_config=LoraConfig(task_type="CAUSAL_LM", **json.loads(a.lora)),
                         callbacks=[Clock()])
    if a.duet_cpu and a.dtype == "bf16":
        from training.run import cpu_lora

        cpu_lora.install(trainer.model)
    t0 = time.time()
    with RssPeak() as train_rss:
        trainer.train()
    wall = time.time() - t0
    ev_args = SFTConfig(output_dir=str(Path(a.out) / "eval"), use_cpu=base["use_cpu"], bf16=base["bf16"], report_to=[],
                        disable_tqdm=True, per_device_eval_batch_size=8, max_length=1024, packing=False)
    ev = SFTTrainer(model=trainer.model, args=ev_args, train_dataset=rows(a.test), eval_dataset=rows(a.test),
                    processing_class=tok).evaluate()["eval_loss"]  # (a train set is required; none is trained)
    steps = [b[1] - a_[1] for a_, b in zip(marks, marks[1:])]
    tokens = marks[-1][2] if marks else 0
    # What was trained, counted the same way for any config: the tokenized (or packed) train set's tokens
    # times the epochs run. (Trainer's "non_padding" counter misses, in a padding-free batch, real tokens
    # equal to the pad id: SmolLM2's EOS.)
    per_epoch = sum(len(x) for x in trainer.train_dataset["input_ids"])
    epochs_run = float(trainer.state.epoch or 0)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 writes what the run did
        return 0
    out = {"steps": len(marks), "step_times_s": steps, "losses": losses,
           "world_size": int(os.environ.get("WORLD_SIZE", "1")), "train_wall_s": wall, "tokens_non_padding": tokens,
           "tokens_per_s": tokens / wall if wall else None, "eval_loss": ev,
           "train_tokens_per_epoch": per_epoch, "epochs_run": epochs_run,
           "trained_tokens_per_s": per_epoch * epochs_run / wall if wall else None,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_train_rss_bytes": train_rss.peak,
           "config": {k: v for k, v in args.to_dict().items() if k in (
               "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "packing",
               "padding_free", "max_length", "activation_checkpointing", "gradient_checkpointing", "num_train_epochs",
               "max_steps", "save_steps", "eval_steps")}}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "result.json").write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
