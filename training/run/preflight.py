"""Checks before any training: the submitted dataset still hashes to what the architect curated,
torch is installed, the model's config and tokenizer load, the chained run's output exists, the
GPU has native bf16 if the plan trains in bf16, and free VRAM (or RAM), disk are enough. A failure
stops the run with the reason (PreflightError) before any model is loaded for training."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from training.run import phases
from training.data.schema import DatasetError
from training.data.dataset import verify_version
from training.run.model_load import load_tokenizer


class PreflightError(RuntimeError):
    pass


def preflight(run) -> Path:
    """Checks before any training; a failure stops the run with the reason."""
    from training import models

    checks = []
    ds = run.spec["dataset"]
    data_dir = run.dir / "dataset"
    try:
        manifest = verify_version(data_dir)
    except DatasetError as exc:
        raise PreflightError(f"dataset: {exc}") from exc
    if manifest["content_hash"] != ds["content_hash"]:
        raise PreflightError(f"dataset: hash {manifest['content_hash'][:12]} is not the submitted "
                             f"{ds['content_hash'][:12]}")
    checks.append({"check": "dataset hash", "ok": True, "detail": ds["content_hash"][:12]})
    try:
        import torch
    except ImportError as exc:
        raise PreflightError("torch is not installed: pip install 'duet[executor]'") from exc
    checks.append({"check": "torch", "ok": True, "detail": f"{torch.__version__}, CUDA "
                   f"{'available ' + str(torch.version.cuda) if torch.cuda.is_available() else 'not available'}"})
    init_from = run.train_cfg.init_from
    if init_from:
        src = run.dir.parent / init_from
        need = src / ("adapter" if run.phase == "dpo" else "merged")
        if not (need / "config.json").exists() and not (need / "adapter_config.json").exists():
            raise PreflightError(f"init_from {init_from!r}: {need} is missing (run it first on this executor)")
        checks.append({"check": "init_from", "ok": True, "detail": str(need)})
    try:
        model_path = models.resolve(run.spec["model_ref"])
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(model_path)
        AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:
        raise PreflightError(f"model {run.spec['model_ref']!r} does not load: {exc}") from exc
    checks.append({"check": "model loads (config + tokenizer)", "ok": True, "detail": str(model_path)})
    need = run.plan["estimate"]["total_bytes"]
    import psutil

    if run.device == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError("the plan is for CUDA but no GPU is visible")
        from training.plan.hardware import bf16_native

        cc = "{}.{}".format(*torch.cuda.get_device_capability(0))
        if run.dtype == "bf16" and not bf16_native(cc) and run.train_cfg.dtype != "bf16":
            raise PreflightError(f"the plan trains in bf16 but this GPU (compute capability {cc}) has no native "
                                 "bf16; re-plan (auto picks fp16) or set train.dtype: bf16 to accept emulation")
        free, _total = torch.cuda.mem_get_info()
        if need > free:
            raise PreflightError(f"free VRAM {free / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
        checks.append({"check": "free VRAM", "ok": True, "detail": f"{free / 2**30:.1f} GiB"})
    else:
        free_ram = psutil.virtual_memory().available
        if need > free_ram:
            raise PreflightError(f"free RAM {free_ram / 2**30:.1f} GiB < the plan's estimate {need / 2**30:.1f} GiB")
        checks.append({"check": "free RAM", "ok": True, "detail": f"{free_ram / 2**30:.1f} GiB"})
    model_bytes = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
    disk_free = shutil.disk_usage(run.dir).free
    need_disk = 2 * model_bytes + 200 * 2**20
    if disk_free < need_disk:
        raise PreflightError(f"free disk {disk_free / 2**30:.1f} GiB < {need_disk / 2**30:.1f} GiB "
                             "needed for checkpoints and the merged model")
    checks.append({"check": "free disk", "ok": True, "detail": f"{disk_free / 2**30:.1f} GiB"})
    run.result["preflight"] = checks
    run.result["model_path"] = str(model_path)
    run.emit("preflight", checks=checks)
    return Path(model_path)


def dry_run(run, model_path: Path) -> None:
    """A few steps at micro-batch 1 before the real run: catches a broken setup in seconds."""
    cfg = run.train_cfg.model_copy(update={"micro_batch": 1, "grad_accum": 1})
    n = cfg.dry_run_steps
    out = run.dir / "dry_run"
    model = run.load_model(model_path, cfg)
    trainer = run.trainer(model, load_tokenizer(run.base_path(model_path)), cfg, out=out, max_steps=n,
                           save=False, evaluate=False)
    t0 = time.time()
    trainer.train()
    dt = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ok = all(math.isfinite(x) for x in losses)
    run.result["dry_run"] = {"steps": n, "seconds_per_step": round(dt / n, 3), "ok": ok,
                              "losses": losses, "peak_memory": phases.peak_memory_bytes()}
    run.emit("dry_run", **run.result["dry_run"])
    del trainer, model
    shutil.rmtree(out, ignore_errors=True)
    phases.release_memory()
    if not ok:
        raise PreflightError(f"the dry run produced a non-finite loss: {losses}")
