"""One training attempt of a run: load the model, build the trainer, evaluate before (the first time),
train (from a checkpoint or not), evaluate after, save the adapter and the result figures.

The engine runs it in its own process (training/run/engine.py); each rank of a data-parallel run runs it
too (training/run/distributed.py), where only the main rank (rank 0) writes: the events, the adapter and
the result. Every rank evaluates and trains, since evaluation and training are collective there.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

from training.run import checkpoints, phases
from training.config import TrainConfig
from training.run.model_load import load_tokenizer, trainable_dtypes
from training.plan.planner import formula_bytes_for
from training.run.policies import RunCancelled
from infra.lazy import lazy

torch = lazy("torch", extra="executor")


def train_attempt(run, model_path: Path, cfg: TrainConfig, from_ckpt: Path | None, callbacks: list, *,
                  main: bool = True, before_train=None) -> dict:
    """Train ``run`` once with ``cfg``; returns the result figures (also merged into ``run.result`` on
    the main rank). RunCancelled when a cancel stopped the training. ``before_train(trainer)``: what a
    data-parallel rank hooks in once the trainer exists (its token counter).

    Long because it is the one sequence every attempt follows (load, eval before, train, eval after, save)."""
    tok = load_tokenizer(run.base_path(model_path))
    run.enter_phase("load")
    model = run.load_model(model_path, cfg)
    staging = run.checkpoint_root / checkpoints.STAGING  # the Trainer saves here; CheckpointCommit commits
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer = run.trainer(model, tok, cfg, out=staging, max_steps=cfg.max_steps, save=True, evaluate=True)
    for cb in callbacks:
        trainer.add_callback(cb)
    if before_train is not None:
        before_train(trainer)
    if from_ckpt is None and "eval_loss_before" not in run.result:
        run.enter_phase("evaluation")
        if main:
            run.emit("eval_started", which="before")
        with rng_kept():  # measuring the base draws nothing the training would have drawn
            before = trainer.evaluate()["eval_loss"]
        if main:
            run.result["eval_loss_before"] = before
            run.eval_losses.append({"step": 0, "eval_loss": float(before)})
            run.emit("eval", which="before", eval_loss=before)
        unmark_prepared(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    run.enter_phase("training")
    trainer.train(resume_from_checkpoint=str(from_ckpt) if from_ckpt else None)
    if run.cancel_requested():
        raise RunCancelled()
    train_s = time.time() - t0
    trained_in = trainable_dtypes(trainer.model)  # before a full fine-tune's weights are cast for saving
    run.train_peak = max(run.train_peak, phases.training_peak(run.peaks)) if run.peaks is not None else run.train_peak
    phases.release_memory()  # what training held and freed goes back before the evaluation (and its measurement)
    run.enter_phase("evaluation")
    if main:
        run.emit("eval_started", which="after")
    after = trainer.evaluate()["eval_loss"]
    result: dict = {"eval_loss_after": after}
    if main:
        run.emit("eval", which="after", eval_loss=after)
        full = cfg.method == "full"
        adapter_dir = run.dir / ("merged" if full else "adapter")  # a full fine-tune's weights are the model
        if full:
            trainer.model.to(run.torch_dtype_of_run()).save_pretrained(adapter_dir, safe_serialization=True)
        else:
            trainer.model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        tokens = int(trainer.state.num_input_tokens_seen or 0)  # every rank's tokens (the Trainer gathers them)
        before = run.result.get("eval_loss_before")
        result.update({
            "train_s": round(train_s, 2), "steps": trainer.state.global_step, "tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
            "train_loss_final": run.losses[-1]["loss"] if run.losses else None,
            "perplexity_before": math.exp(min(before, 50)) if before is not None and run.phase == "sft" else None,
            "perplexity_after": math.exp(min(after, 50)) if run.phase == "sft" else None,
            ("model_path" if full else "adapter_path"): str(adapter_dir),
            "trainable_dtypes": trained_in,  # what trained: fp32 (LoRA's adapters, a full fine-tune's master weights)
            "train_peak_formula_bytes": formula_bytes_for(cfg, run.base_path(model_path), run.device, run.dtype),
            "train_peak_bytes": int(run.train_peak),
            "train_peak_measured_as": ("torch.cuda.max_memory_reserved()" if torch.cuda.is_available()
                                       else "peak process RSS during training (sampled every 50 ms)"),
        })
        run.result.update(result)
    del trainer, model
    phases.release_memory()
    return result


@contextlib.contextmanager
def rng_kept():
    """Python's, NumPy's and torch's random states (CPU and this process's GPU) as they were before the block.

    The evaluation before training draws from the global generator (each pass over a DataLoader takes
    a seed from it), so the LoRA dropout masks of the training that follows would differ from those of
    a script that trains without evaluating first: the same config would give other losses than
    plain TRL's (about 2e-3 apart at dropout 0.05, benchmarks/data_parallel.py)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    # this process's GPU only: forking every visible GPU's generator would open a CUDA context on each
    # (a data-parallel rank sees all of its node's GPUs)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def unmark_prepared(trainer) -> None:
    """Let the Trainer wrap the model for data-parallel training after an evaluation.

    transformers 5.23's evaluation prepares the bare model with Accelerate (``evaluation_mode=True``:
    no DistributedDataParallel), which marks it ``_is_accelerate_prepared``; the ``train()`` that
    follows then takes the mark for "wrapped already" and trains without DDP: no gradient is
    all-reduced and every rank drifts on its own shard (found by the 2-worker vs 1-worker loss test:
    equal at steps 1-2, apart from step 3). Nothing to do in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    trainer.accelerator._models = [m for m in trainer.accelerator._models if m is not trainer.model]
