"""The GPU path, measured on a GPU (issues 15 and 36): duet's engine on random-initialised models built
from configs, no network, no Ray, no stores. ``benchmarks/gpu_check.sh`` runs it with the planner
benchmark (which covers the 7-8B shapes in 4-bit for memory); ``--smoke`` runs the same code on this CPU
with tiny shapes, and ``make test`` runs the smoke (tests/integration/test_gpu_check_smoke.py), so the
script a lent GPU runs is never broken by a later change.

    python -m benchmarks.gpu_check --out DIR [--smoke] [--steps N]

Runs, each through training.run.executor.Executor (the engine, its watchdog and its exporter), on the
Qwen2-1.5B shape unless named: LoRA SFT, the same packed, QLoRA SFT, LoRA DPO and QLoRA DPO (pairs
built from the persona data), a full fine-tune (SmolLM2-135M shape), and a real OOM: LoRA SFT with
``DUET_FAULT=memcap@step=3`` (training/run/memory_cap.py: the allocator's per-process fraction drops
under what a step takes, the step fails in the allocator, the OOM policy re-plans and resumes). Records for each: the plan's dtype and decisions, the dtypes that trained
(LoRA: fp32 as planned), tokens/s, MFU (6 x parameters x tokens/s over the device's dense bf16 peak),
every phase's measured peak against the planner's estimate, the merge criterion and, for QLoRA, the
drift, the recoveries. Then the exporter's /metrics text (saved for `promtool check metrics`, which does
not travel; the NVML series it must hold, duet's own process memory included, are checked here), and
the same LoRA SFT as plain TRL scripts with nothing of duet's (benchmarks/plain_trl.py): TRL as a user
writes it, and with TRL's ``use_liger_kernel`` (when liger-kernel is installed), for tokens/s side by side.
Writes DIR/gpu_check.json (and metrics.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERSONA = ROOT / "examples" / "persona" / "persona.jsonl"
from benchmarks.vram_planner import SIZES  # noqa: E402  (one table of model shapes for both benchmarks)

SHAPES = {"smollm2-135m": SIZES["small"], "qwen2-1.5b": SIZES["1.5B"], "tiny": SIZES["tiny"]}
NVML_SERIES = ("duet_gpu_process_memory_bytes", "duet_gpu_memory_used_bytes", "duet_gpu_memory_total_bytes", "duet_gpu_temperature_celsius",
               "duet_gpu_utilization_ratio", "duet_gpu_power_watts")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def model_folder(shape: str, root: Path) -> Path:
    """A random-initialised Qwen2 model of ``shape`` with duet's offline tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from training import models

    out = root / f"model-{shape}"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(models.tiny_folder())
    cfg = Qwen2Config(**SHAPES[shape], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      max_position_embeddings=4096)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def datasets(root: Path) -> dict:
    """The persona data as an SFT dataset version, and DPO pairs made from it (another record's answer
    is the rejected one)."""
    from training.data.curate import build_version

    sft = build_version([PERSONA], root / "datasets", "persona", test_frac=0.1, seed=0)
    recs = [json.loads(x) for x in PERSONA.read_text().splitlines() if x.strip()]
    rng = random.Random(0)
    pairs = []
    for i, r in enumerate(recs):
        other = recs[(i + 1 + rng.randrange(len(recs) - 1)) % len(recs)]
        if other["messages"][-1]["content"] == r["messages"][-1]["content"]:
            continue
        pairs.append({"id": f"pair-{i}", "prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
                      "rejected": [other["messages"][-1]]})
    f = root / "pairs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    dpo = build_version([f], root / "datasets", "pairs", test_frac=0.1, seed=0)
    return {"sft": sft, "dpo": dpo}


def _flops_peak() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def one_run(ex, run_id: str, shape: str, folder: Path, ds, overrides: dict, hw, fault: str | None = None) -> dict:
    from training.run.executor import make_spec
    from training.plan.memory_model import ModelProfile
    from training.config import load_config
    from training.plan.planner import make_plan

    cfg = load_config("demo", overrides)
    model = ModelProfile.from_config(folder / "config.json")
    lengths = (ds.manifest.get("tokens") or {}).get("percentiles") or {}
    plan = make_plan(cfg, model, device=hw.device, bf16=hw.bf16, budget_bytes=hw.memory_budget_bytes,
                     token_p50=lengths.get("p50"), token_mean=lengths.get("mean"),
                     train_examples=ds.manifest["counts"]["train"], host_ram_bytes=hw.ram_available_bytes)
    d = plan.to_dict()
    d.update(run_id=run_id, model_ref=str(folder), dataset={"name": ds.name, "content_hash": ds.content_hash},
             hardware={"hostname": hw.hostname, "device": hw.device})
    t0 = time.time()
    if fault:
        os.environ["DUET_FAULT"] = fault
    try:
        ex.submit(make_spec(d, ds.path))
        state = ex.wait(run_id, timeout=1800)
    finally:
        os.environ.pop("DUET_FAULT", None)
    run_dir = ex.data_dir / "runs" / run_id
    rec = json.loads((run_dir / "run.json").read_text())
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines() if x.strip()]
    peak = _flops_peak()
    tps = rec.get("tokens_per_s")
    m = rec.get("merged_model") or {}
    return {"run_id": run_id, "shape": shape, "state": state, "error": rec.get("error"), "wall_s": round(time.time() - t0, 1),
            "method": cfg.method, "phase": cfg.phase, "packing": d["train"].get("packing"), "dtype": d["dtype"],
            "decisions": d["decisions"], "trainable_dtypes": rec.get("trainable_dtypes"),
            "fits": d["estimate"]["fits"], "tokens_per_s": tps,
            "mfu": round(6 * model.params * tps / peak, 4) if peak and tps else None,
            "mfu_note": "6 x parameters x tokens/s / dense bf16 peak (LoRA trains fewer FLOPs than 6N; a convention)",
            "phases": rec.get("phases"), "estimate_whole_run_bytes": d["estimate"]["whole_run_bytes"],
            "merge": {k: m.get(k) for k in ("dtype", "criterion", "verified", "qlora_drift", "device")},
            "eval_loss": [rec.get("eval_loss_before"), rec.get("eval_loss_after")],
            "fault": fault, "recoveries": rec.get("recoveries"),
            "memory_capped": [e for e in events if e.get("event") == "memory_capped"],
            "gpu_memory_alerts": [e for e in events if e.get("event") == "alert" and e.get("rule") == "gpu_memory_high"]}


def plain_trl(folder: Path, ds, out: Path, steps: int, micro_batch: int, liger: bool = False) -> dict | None:
    """benchmarks/plain_trl.py (nothing of duet's) on the LoRA SFT case; ``liger``: TRL's use_liger_kernel."""
    if liger:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as exc:
            return {"error": f"liger-kernel not installed ({exc}); add its wheel to .whl/"}
    cfg = {"per_device_train_batch_size": micro_batch, "gradient_accumulation_steps": 1, "max_steps": steps,
           "learning_rate": 1e-3, "max_length": 256, "save_strategy": "no", "eval_strategy": "no",
           **({"use_liger_kernel": True} if liger else {})}
    import torch

    dtype = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    r = subprocess.run([sys.executable, "-m", "benchmarks.plain_trl", "--model", str(folder), "--dtype", dtype,
                        "--train", str(ds.path / "train.jsonl"), "--test", str(ds.path / "test.jsonl"),
                        "--out", str(out), "--config", json.dumps(cfg)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    if r.returncode != 0:
        return {"error": r.stderr[-2000:]}
    return {**json.loads((out / "result.json").read_text()), "dtype": dtype, "liger": liger}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (CPU)")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from training.plan import hardware
    from training.run.executor import Executor

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="duet-gpu-check-"))
    hw = hardware.probe(root)
    small, mid = ("tiny", "tiny") if a.smoke else ("smollm2-135m", "qwen2-1.5b")
    steps = 4 if a.smoke else a.steps
    base = {"max_steps": steps, "checkpoint_every": steps, "eval_every": steps, "warmup_steps": 1, "sample_prompts": 1,
            "max_new_tokens": 16}
    port = 29000 + os.getpid() % 1000
    ex = Executor(root / "data", metrics_port=port)
    ds = datasets(root)
    oom = {"max_steps": max(steps, 6), "checkpoint_every": 2, "eval_every": max(steps, 6)}
    # (run id, shape, dataset, overrides, DUET_FAULT), most wanted first: a case that runs out of time
    # still leaves the ones before it in gpu_check.json
    cases = [("lora-sft", mid, ds["sft"], {}, None),
             ("qlora-sft", mid, ds["sft"], {"method": "qlora"}, None),
             ("lora-dpo", mid, ds["dpo"], {"phase": "dpo", "learning_rate": 5e-5}, None),
             ("qlora-dpo", mid, ds["dpo"], {"phase": "dpo", "method": "qlora", "learning_rate": 5e-5}, None),
             ("lora-sft-packed", mid, ds["sft"], {"packing": True}, None),
             ("oom-recovery", mid, ds["sft"], oom, "memcap@step=3"),
             ("full-sft", small, ds["sft"], {"method": "full", "learning_rate": 1e-5}, None)]
    doc = {"benchmark": "gpu_check", "host": socket.gethostname(), "smoke": a.smoke,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{os.cpu_count()}c",
           "hardware": hw.to_dict(), "versions": {"torch": torch.__version__}, "runs": []}
    for name in ("transformers", "trl", "peft", "bitsandbytes", "liger_kernel"):
        try:
            doc["versions"][name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001  (a missing library is a finding, not a crash)
            doc["versions"][name] = f"missing: {exc}"
    for run_id, shape, dsv, over, fault in cases:
        try:
            row = one_run(ex, run_id, shape, model_folder(shape, root), dsv, {**base, **over}, hw, fault)
        except Exception as exc:  # noqa: BLE001  (one failing case must not lose the others' results)
            row = {"run_id": run_id, "state": "crashed", "error": f"{type(exc).__name__}: {exc}"}
        doc["runs"].append(row)
        print(json.dumps(row)[:2000], flush=True)
        (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        (out / "metrics.txt").write_text(text)
        from prometheus_client.parser import text_string_to_metric_families

        names = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        doc["exporter"] = {"series": len(names), "nvml_present": {n: n in names for n in NVML_SERIES},
                           "parsed": True, "promtool": "run `promtool check metrics < metrics.txt` on the design host"}
    except Exception as exc:  # noqa: BLE001
        doc["exporter"] = {"error": f"{type(exc).__name__}: {exc}"}
    duet_lora = next((r for r in doc["runs"] if r["run_id"] == "lora-sft"), {})
    for key, liger in (("plain_trl_lora_sft", False), ("plain_trl_liger_lora_sft", True)):
        plain = plain_trl(model_folder(mid, root), ds["sft"], root / key, steps, 4, liger=liger)
        doc[key] = {k: plain.get(k) for k in ("tokens_per_s", "trained_tokens_per_s", "peak_rss_bytes", "eval_loss",
                                              "dtype", "liger", "error")} if plain else None
        if plain and plain.get("tokens_per_s") and duet_lora.get("tokens_per_s"):
            doc[f"tokens_per_s_ratio_duet_to_{key.removesuffix('_lora_sft')}"] = round(
                duet_lora["tokens_per_s"] / plain["tokens_per_s"], 3)
        (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, default=str)[:3000])
    return 0 if all(r.get("state") == "finished" for r in doc["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
