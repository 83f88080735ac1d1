"""The run engine: pre-flight, LoRA/QLoRA SFT on TRL + PEFT, checkpoints, eval, merge, report.

A plain class (no Ray): the ExecutorActor runs ``Run.execute()`` in a background thread and reads
``Run.snapshot()``. Everything a run produces goes under its run dir::

    <data_dir>/runs/<run_id>/
        run.json  report.md  loss.png  events.jsonl   (small: copied to the workspace)
        checkpoints/checkpoint-<step>/                (adapter + trainer state; stays here)
        adapter/  merged/                             (final adapter, merged 16/32-bit model)

Invariants: run.json is rewritten atomically at each state change; events.jsonl is append-only;
a failed pre-flight stops the run before any training.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import threading
import time
import traceback
from pathlib import Path

from training import telemetry
from training.dataset import DatasetError, verify_version

TERMINAL = ("finished", "failed", "cancelled")


class PreflightError(RuntimeError):
    pass


class RunCancelled(Exception):
    pass


def code_sha() -> str:
    """The git SHA of the duet checkout this code runs from, or its package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        import git

        return git.Repo(root).head.commit.hexsha
    except Exception:
        try:
            from importlib.metadata import version

            return f"duet-{version('duet')}"
        except Exception:
            return "unknown"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def peak_memory_bytes() -> dict:
    out = {"rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except ImportError:
        pass
    return out


class Run:
    """One training run. ``spec`` is what the architect submitted:

    ``{"run_id", "plan": Plan.to_dict(), "model_ref", "dataset": {"name", "content_hash",
    "files": {"train.jsonl": text, "test.jsonl": text, "manifest.json": text}}}``
    """

    def __init__(self, spec: dict, data_dir: str | os.PathLike, hardware: dict):
        self.spec = spec
        self.run_id: str = spec["run_id"]
        self.plan: dict = spec["plan"]
        self.train_cfg: dict = self.plan["train"]
        self.phase: str = self.train_cfg["phase"]
        self.dir = Path(data_dir) / "runs" / self.run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hardware = hardware
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.events: list[dict] = []
        self.state = "queued"
        self.progress = {"step": 0, "max_steps": self.train_cfg["max_steps"], "loss": None, "eval_loss": None,
                         "learning_rate": None, "grad_norm": None, "tokens_per_second": None, "eta_s": None}
        self.losses: list[dict] = []
        self.eval_losses: list[dict] = []
        self.checkpoints: list[dict] = []
        self.result: dict = {}
        self.error: str | None = None
        self._train_peak = 0
        self.started = time.time()
        self._write_record()

    # -- state shared with the actor ------------------------------------------------------------

    def emit(self, kind: str, **payload) -> None:
        """Record a run event: kept in memory (the architect polls them), appended to events.jsonl."""
        with self._lock:
            ev = {"seq": len(self.events), "time": time.time(), "run_id": self.run_id, "event": kind, **payload}
            self.events.append(ev)
        with open(self.dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(ev, default=str) + "\n")

    def set_state(self, state: str) -> None:
        self.state = state
        telemetry.set_state(self.run_id, self.phase, state)
        self.emit("state", state=state)
        self._write_record()

    def snapshot(self, since: int = 0) -> dict:
        with self._lock:
            return {"run_id": self.run_id, "state": self.state, "progress": dict(self.progress),
                    "events": self.events[since:], "error": self.error, "result": dict(self.result)}

    def cancel(self) -> None:
        self._cancel.set()

    def record(self) -> dict:
        ds = self.spec["dataset"]
        manifest = json.loads(ds["files"]["manifest.json"])
        return {
            "schema_version": 1,
            "run_id": self.run_id,
            "status": self.state,
            "error": self.error,
            "name": self.train_cfg["name"],
            "phase": self.phase,
            "started": self.started,
            "dataset": {"name": ds["name"], "content_hash": ds["content_hash"],
                        "counts": manifest.get("counts", {})},
            "config": self.plan,
            "model": {"ref": self.spec["model_ref"]},
            "code_sha": code_sha(),
            "host": self.hardware,
            "checkpoints": self.checkpoints,
            "losses": self.losses,
            "eval_losses": self.eval_losses,
            **self.result,
        }

    def _write_record(self) -> None:
        _atomic_json(self.dir / "run.json", self.record())

    # -- the run ----------------------------------------------------------------------------------

    def execute(self) -> None:
        """Run to completion; never raises (the outcome is in state/error/run.json)."""
        t0 = time.time()
        try:
            self.set_state("preflight")
            data_dir, model_path = self.preflight()
            self.set_state("training")
            self.train(data_dir, model_path)
            self.set_state("merging")
            self.merge_and_evaluate(data_dir, model_path)
            self.set_state("reporting")
            self.result["wall_s"] = round(time.time() - t0, 2)
            self.result["peak_memory"] = peak_memory_bytes()
            from training.report import write_loss_plot, write_report

            write_loss_plot(self.dir / "loss.png", self.losses, self.eval_losses, self.run_id)
            self.state = "finished"
            self._write_record()
            write_report(self.dir / "report.md", self.record())
            self.set_state("finished")
        except RunCancelled:
            self.set_state("cancelled")
        except Exception as exc:  # the outcome is reported, not raised, in the background thread
            self.error = f"{type(exc).__name__}: {exc}"
            self.emit("error", message=self.error, traceback=traceback.format_exc()[-4000:])
            self.set_state("failed")
        finally:
            telemetry.sample_host()

    def preflight(self) -> tuple[Path, Path]:
        """Checks before any training; a failure stops the run with the reason."""
        from training import models

        checks = []
        ds = self.spec["dataset"]
        data_dir = self.dir / "dataset"
        data_dir.mkdir(exist_ok=True)
        for name, text in ds["files"].items():
            (data_dir / name).write_text(text, encoding="utf-8")
        try:
            manifest = verify_version(data_dir)
        except DatasetError as exc:
            raise PreflightError(f"dataset: {exc}") from exc
        if manifest["content_hash"] != ds["content_hash"]:
            raise PreflightError(f"dataset: hash {manifest['content_hash'][:12]} is not the submitted "
                                 f"{ds['content_hash'][:12]}")
        checks.append({"check": "dataset hash", "ok": True, "detail": ds["content_hash"][:12]})
        try:
            model_path = models.resolve(self.spec["model_ref"])
            from transformers import AutoConfig, AutoTokenizer

            AutoConfig.from_pretrained(model_path)
            AutoTokenizer.from_pretrained(model_path)
        except Exception as exc:
            raise PreflightError(f"model {self.spec['model_ref']!r} does not load: {exc}") from exc
        checks.append({"check": "model loads (config + tokenizer)", "ok": True, "detail": str(model_path)})
        need = self.plan["estimate"]["total_bytes"]
        import psutil

        hw_free = psutil.virtual_memory().available
        dev = self.plan["device"]
        if dev == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise PreflightError("the plan is for CUDA but no GPU is visible")
            free, _total = torch.cuda.mem_get_info()
            if need > free:
                raise PreflightError(f"free VRAM {free / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
            checks.append({"check": "free VRAM", "ok": True, "detail": f"{free / 2**30:.1f} GiB"})
        elif need > hw_free:
            raise PreflightError(f"free RAM {hw_free / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
        checks.append({"check": "free RAM", "ok": True, "detail": f"{hw_free / 2**30:.1f} GiB"})
        model_bytes = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
        disk_free = shutil.disk_usage(self.dir).free
        need_disk = 2 * model_bytes + 200 * 2**20
        if disk_free < need_disk:
            raise PreflightError(f"free disk {disk_free / 2**30:.1f} GiB < {need_disk / 2**30:.1f} GiB "
                                 "needed for checkpoints and the merged model")
        checks.append({"check": "free disk", "ok": True, "detail": f"{disk_free / 2**30:.1f} GiB"})
        self.result["preflight"] = checks
        self.result["model_path"] = str(model_path)
        self.emit("preflight", checks=checks)
        return data_dir, Path(model_path)

    def _torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.plan["dtype"]]

    def train(self, data_dir: Path, model_path: Path) -> None:
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from training.dataset import load_split

        cfg = self.train_cfg
        if self.phase != "sft":
            raise PreflightError(f"phase {self.phase!r} is not built yet (SFT only; DPO is issue 4)")
        if cfg["method"] == "qlora":
            raise PreflightError("method 'qlora' is not built yet (issue 4); use 'lora'")
        torch.manual_seed(cfg["seed"])
        tok = AutoTokenizer.from_pretrained(model_path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self._torch_dtype())

        def rows(which: str) -> Dataset:
            return Dataset.from_list([{"messages": r["messages"]} for r in load_split(data_dir, which)])

        train_ds, test_ds = rows("train"), rows("test")
        lora = cfg["lora"]
        peft_cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                              target_modules=lora["target_modules"], task_type="CAUSAL_LM")
        on_cpu = self.plan["device"] != "cuda"
        args = SFTConfig(
            output_dir=str(self.dir / "checkpoints"),
            max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["micro_batch"],
            gradient_accumulation_steps=cfg["grad_accum"], per_device_eval_batch_size=cfg["micro_batch"],
            learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["lr_scheduler"],
            warmup_steps=cfg["warmup_steps"], max_length=cfg["seq_len"], packing=cfg["packing"],
            activation_checkpointing=cfg["gradient_checkpointing"], seed=cfg["seed"], data_seed=cfg["seed"],
            logging_steps=1, eval_strategy="steps", eval_steps=cfg["eval_every"],
            save_strategy="steps", save_steps=cfg["checkpoint_every"], save_total_limit=cfg["keep_checkpoints"],
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=on_cpu,
            bf16=self.plan["dtype"] == "bf16", fp16=self.plan["dtype"] == "fp16",
            include_num_input_tokens_seen=True, dataset_num_proc=None,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=test_ds,
                             processing_class=tok, peft_config=peft_cfg)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(_Progress(self))
        self.emit("eval_started", which="before")
        before = trainer.evaluate()["eval_loss"]
        self.result["eval_loss_before"] = before
        self.eval_losses.append({"step": 0, "eval_loss": float(before)})
        self.emit("eval", which="before", eval_loss=before)
        self._train_peak = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        trainer.train()
        if self._cancel.is_set():
            raise RunCancelled()
        train_s = time.time() - t0
        self.emit("eval_started", which="after")
        after = trainer.evaluate()["eval_loss"]
        self.result["eval_loss_after"] = after
        self.emit("eval", which="after", eval_loss=after)
        adapter_dir = self.dir / "adapter"
        trainer.model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        if torch.cuda.is_available():
            self._train_peak = torch.cuda.max_memory_reserved()
        self.result["train_peak_bytes"] = int(self._train_peak)
        self.result["train_peak_measured_as"] = ("torch.cuda.max_memory_reserved()" if torch.cuda.is_available()
                                                 else "max process RSS sampled every step")
        self.result.update({
            "train_s": round(train_s, 2), "steps": trainer.state.global_step, "tokens": tokens,
            "tokens_per_s": round(tokens / train_s, 1) if train_s > 0 else None,
            "train_loss_final": self.losses[-1]["loss"] if self.losses else None,
            "perplexity_before": math.exp(min(before, 50)), "perplexity_after": math.exp(min(after, 50)),
            "adapter_path": str(adapter_dir),
        })
        del trainer, model
        import gc

        gc.collect()

    def merge_and_evaluate(self, data_dir: Path, model_path: Path) -> None:
        """Merge the adapter into the 16/32-bit base (never 4-bit weights), verify the merged model's
        logits against adapter+base, save with safetensors, and generate samples."""
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from training.dataset import load_split

        tok = AutoTokenizer.from_pretrained(self.dir / "adapter")
        dtype = self._torch_dtype() if self.plan["dtype"] != "fp32" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, self.dir / "adapter")
        model.eval()
        test = load_split(data_dir, "test")
        prompts = [r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"] for r in test]
        probe = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[:2]]
        enc = [tok(t, return_tensors="pt") for t in probe]
        with torch.no_grad():
            ref = [model(**e).logits for e in enc]
            merged = model.merge_and_unload()
            got = [merged(**e).logits for e in enc]
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got)) if enc else 0.0
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        if diff > tol:
            raise RuntimeError(f"merged model's logits differ from adapter+base by {diff:.2e} (> {tol})")
        merged_dir = self.dir / "merged"
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tok.save_pretrained(merged_dir)
        self.result["merged_model"] = {"path": str(merged_dir), "logit_max_abs_diff": diff,
                                       "verified_prompts": len(enc)}
        self.emit("merged", path=str(merged_dir), logit_max_abs_diff=diff)
        samples = []
        n = self.train_cfg.get("sample_prompts", 3)
        for rec, p in list(zip(test, prompts))[:n]:
            text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            e = tok(text, return_tensors="pt")
            with torch.no_grad():
                out = merged.generate(**e, max_new_tokens=self.train_cfg.get("max_new_tokens", 48), do_sample=False,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id)
            gen = tok.decode(out[0, e["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            samples.append({"id": rec["id"], "prompt": p[-1]["content"], "reference": rec["messages"][-1]["content"],
                            "generated": gen})
        self.result["samples"] = samples
        self.emit("samples", count=len(samples))


def _make_progress_class():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Feeds run state, events and Prometheus metrics from the trainer's logs."""

        def __init__(self, run: Run):
            self.run = run
            self.m = telemetry.metrics()
            self.lab = (run.run_id, run.phase)
            self.t_last = None
            self.tokens_last = 0
            self.t_start = None
            self.save_t0 = None

        def on_train_begin(self, args, state, control, **kw):
            self.t_start = self.t_last = time.time()
            self.m["max_steps"].labels(*self.lab).set(state.max_steps)

        def on_step_end(self, args, state, control, **kw):
            if self.run._cancel.is_set():
                control.should_training_stop = True
            now = time.time()
            tokens = int(state.num_input_tokens_seen or 0)
            dt = now - (self.t_last or now)
            dtok = tokens - self.tokens_last
            p = self.run.progress
            if dt > 0 and dtok > 0:
                tps = dtok / dt
                p["tokens_per_second"] = round(tps, 1)
                self.m["tokens_per_second"].labels(*self.lab).set(tps)
                self.m["tokens"].labels(*self.lab).inc(dtok)
            self.m["samples"].labels(*self.lab).inc(args.per_device_train_batch_size * args.gradient_accumulation_steps)
            self.t_last, self.tokens_last = now, tokens
            p["step"] = state.global_step
            elapsed = now - self.t_start
            p["eta_s"] = round(elapsed / state.global_step * (state.max_steps - state.global_step), 1)
            self.m["step"].labels(*self.lab).set(state.global_step)
            import psutil

            self.run._train_peak = max(self.run._train_peak, psutil.Process().memory_info().rss)
            self.m["epoch"].labels(*self.lab).set(state.epoch or 0)
            if state.global_step % 50 == 0:
                from training.report import write_loss_plot

                write_loss_plot(self.run.dir / "loss.png", self.run.losses, self.run.eval_losses, self.run.run_id)
            telemetry.sample_host()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            p = self.run.progress
            step = state.global_step
            if "loss" in logs:
                entry = {"step": step, "loss": float(logs["loss"])}
                for key, name in (("learning_rate", "lr"), ("grad_norm", "grad_norm")):
                    if logs.get(key) is not None:
                        entry[key] = float(logs[key])
                        self.m[name].labels(*self.lab).set(float(logs[key]))
                        p[key] = float(logs[key])
                self.run.losses.append(entry)
                p["loss"] = entry["loss"]
                self.m["loss"].labels(*self.lab).set(entry["loss"])
            if "eval_loss" in logs and state.global_step > 0:
                self.run.eval_losses.append({"step": step, "eval_loss": float(logs["eval_loss"])})
                p["eval_loss"] = float(logs["eval_loss"])
                self.m["eval_loss"].labels(*self.lab).set(float(logs["eval_loss"]))
                self.run.emit("eval", which=f"step {step}", step=step, eval_loss=float(logs["eval_loss"]))

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            ok = (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
            self.run.checkpoints.append({"step": state.global_step, "path": str(ckpt), "valid": ok})
            self.m["checkpoints"].labels(*self.lab).inc()
            self.run.emit("checkpoint", step=state.global_step, path=str(ckpt), valid=ok)
            self.run._write_record()

    return Progress


def _Progress(run: Run):
    return _make_progress_class()(run)
