"""``duet export``: a finished run's merged model -> ``<name>.gguf`` + ``Modelfile`` + README.md, verified.

The export is reported done only after verification:

1. the file is read back with the ``gguf`` reader: its architecture, and every tensor's name and
   shape as planned;
2. transformers' GGUF loader (``gguf_file=``) loads the tokenizer and the model from it;
3. on held-out prompts (the run's test split, rendered with the chat template), the tokenizer gives
   the same ids as the merged model's, and the fp32 logits agree with the merged model's within a
   bound of the quantization (``BOUNDS``: top-1 agreement at every position and the mean KL a token).

A failed verification deletes the files and says why. The run record (run.json, report.md) gains an
``exported`` entry (paths, sizes, sha256, verification, the Modelfile's decisions). The architect
commits that record to the workspace and adds a cortex fact.

Also: ``export_adapter`` writes the LoRA adapter alone as a GGUF LoRA file (llama.cpp ``--lora``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from training.dataset import sha256_file  # noqa: F401  (tests and the CLI check files with it)
from training.gguf_write import QUANTS, ExportError, gguf_arch, write_gguf, write_lora_gguf

# (minimum top-1 agreement over every position, maximum mean KL(merged || gguf) a token), per quantization.
# Measured on this CPU: f16 KL 3e-6 (tiny Qwen2 and SmolLM2-135M); bf16 3e-6 (tiny); q8_0 3e-5 (tiny) and
# 1.2e-3 to 2.5e-3 (SmolLM2, tie-aware top-1 0.985). The bounds leave room for larger models and prompts.
BOUNDS = {"f16": (0.99, 1e-3), "bf16": (0.97, 5e-3), "q8_0": (0.90, 2e-2)}
TIE_LOGITS = 0.05  # SmolLM2 f16 (measured): 1 of 65 positions picks another token, within 0.05 of the top (max |diff| 0.04)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PROBE_TEXTS = ["Hello! Tell me something about yourself.", "Write a haiku about the sea at 3 am, in 17 syllables."]


def expected_bytes(folder: Path, quant: str) -> int:
    """What the GGUF will take on disk, from the safetensors headers (plus room for the vocabulary)."""
    from training.gguf_write import tensor_shapes

    per = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[quant]
    return int(sum(math.prod(s) * (4 if len(s) == 1 else per) for s in tensor_shapes(folder))) + 32 * 2**20


def verify_ram_bytes(folder: Path) -> float:
    """RAM the verification needs: one fp32 copy of the model (they are loaded one after the other),
    plus a quarter for the activations and the loader's temporaries, plus the runtime."""
    from training.gguf_write import tensor_shapes

    return sum(math.prod(s) for s in tensor_shapes(folder)) * 4 * 1.25 + 512 * 2**20


def probe_prompts(run_dir: Path, tokenizer, n: int = 4, *, templated: bool = True) -> list[str]:
    """Held-out prompts as the model sees them: the test split's conversations without their last
    answer, through the chat template (DPO: the prompt); plain probe texts when there is none.
    ``templated=False``: the turns' text alone. For a SentencePiece-style vocabulary, transformers'
    GGUF reload puts no word-start marker after a special token, where the HF tokenizer and llama.cpp
    do, so a rendered template would fail the ids check for a reason outside the file."""
    out = []
    test = run_dir / "dataset" / "test.jsonl"
    for line in test.read_text(encoding="utf-8").splitlines() if test.is_file() else []:
        if len(out) >= n:
            break
        if not line.strip():
            continue
        rec = json.loads(line)
        msgs = rec.get("messages") or rec.get("prompt")
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            continue
        if templated and getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            out.append("\n".join(m["content"] for m in msgs))
    return out or PROBE_TEXTS[:n]


def _read_back(path: Path, arch: str, tensors: int) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    got_arch = r.fields["general.architecture"].contents()
    if got_arch != arch:
        raise ExportError(f"{path.name}: read back architecture {got_arch!r}, wrote {arch!r}")
    if len(r.tensors) != tensors:
        raise ExportError(f"{path.name}: {len(r.tensors)} tensors read back, {tensors} written")
    for t in r.tensors:
        if any(int(d) <= 0 for d in t.shape):
            raise ExportError(f"{path.name}: tensor {t.name} has shape {list(t.shape)}")
    return {"architecture": got_arch, "tensors": len(r.tensors), "metadata_keys": len(r.fields)}


def verify(merged: Path, gguf_path: Path, prompts: list[str], quant: str, arch: str, tensors: int) -> dict:
    """Read back, reload with transformers, compare ids and logits (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = _read_back(gguf_path, arch, tensors)
    ref_tok = AutoTokenizer.from_pretrained(merged)
    g_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    enc = []
    for p in prompts:
        a, b = ref_tok(p)["input_ids"][:256], g_tok(p)["input_ids"][:256]
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ExportError(f"the GGUF's tokenizer splits a held-out prompt differently from the merged model's "
                              f"(first difference at token {first}: {a[first:first + 5]} vs {b[first:first + 5]})")
        enc.append(torch.tensor([a]))
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [model(x).logits[0].float() for x in enc]
    del model
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = [model(x).logits[0].float() for x in enc]
    del model
    raw = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    # a position agrees when the GGUF picks the merged model's top token, or one within TIE_LOGITS of it
    # (a near tie: the two tokens are equally good at this precision)
    agree = sum(int((r.max(-1).values - r.gather(-1, g.argmax(-1, keepdim=True)).squeeze(-1) <= TIE_LOGITS).sum())
                for r, g in zip(ref, got))
    positions = sum(r.shape[0] for r in ref)
    kl = sum(float(torch.nn.functional.kl_div(g.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                              reduction="sum")) for r, g in zip(ref, got)) / positions
    top1 = agree / positions
    min_top1, max_kl = BOUNDS[quant]
    out = {**back, "prompts": len(prompts), "positions": positions, "top1_agreement": round(top1, 4),
           "top1_exact": round(raw / positions, 4), "tie_logits": TIE_LOGITS,
           "kl_mean": kl, "max_abs_logit_diff": max(float((r - g).abs().max()) for r, g in zip(ref, got)),
           "bounds": {"min_top1": min_top1, "max_kl_mean": max_kl}, "tokenizer_ids_equal": True}
    if top1 < min_top1 or kl > max_kl or not all(torch.isfinite(g).all() for g in got):
        raise ExportError(f"the GGUF's logits drift from the merged model's: top-1 agreement {top1:.3f} (at least "
                          f"{min_top1}), mean KL {kl:.2e} (at most {max_kl:.0e}) over {positions} positions")
    return out


def _readme(name: str, gguf_name: str, family: str | None) -> str:
    lines = [f"# {name}", "", "Exported by `duet export`; verified against the merged model before it was reported.", "",
             "Ollama:", "", "```", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
             "llama.cpp:", "", "```", f"llama-cli -m {gguf_name} -cnv", "```", ""]
    if family is None:
        lines += ["The Modelfile has no TEMPLATE: Ollama uses the chat template stored in the GGUF.", ""]
    return "\n".join(lines)


def check_room(merged: Path, out_dir: Path, to: str, quant: str) -> None:
    """Before anything is written: the disk holds the file, and RAM holds the verification (one fp32 copy)."""
    import psutil

    need = expected_bytes(merged, quant) if to == "gguf" else sum(f.stat().st_size for f in merged.iterdir())
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ExportError(f"{out_dir}: {free / 2**30:.2f} GiB free, the export needs about {need / 2**30:.2f} GiB")
    if to == "gguf":
        ram, avail = int(verify_ram_bytes(merged)), psutil.virtual_memory().available
        if ram > avail:
            raise ExportError(f"verifying the export loads the model in fp32: about {ram / 2**30:.1f} GiB of RAM, "
                              f"{avail / 2**30:.1f} GiB available; free memory (stop the training?) and retry")


def export_run(run_dir: Path, *, to: str = "gguf", quant: str = "f16", name: str | None = None,
               out_dir: Path | None = None) -> dict:
    """Export a finished run whose merged model exists (the caller merges first when it does not).
    Returns the ``exported`` entry, also appended to run.json and shown in report.md."""
    from transformers import AutoTokenizer

    from training import ollama, report, run_files

    t0 = time.time()
    rec = json.loads((run_dir / "run.json").read_text())
    if rec.get("status") != "finished":
        raise ExportError(f"run {rec.get('run_id')} is {rec.get('status')}: only a finished run is exported")
    merged = run_dir / "merged"
    if not (merged / "config.json").is_file():
        raise ExportError(f"{merged}: no merged model (merge the run first: duet merge {rec['run_id']})")
    if to not in ("gguf", "safetensors"):
        raise ExportError(f"--to {to!r}: use gguf or safetensors")
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    name = name or rec.get("name") or rec["run_id"]
    if not NAME.fullmatch(name):
        raise ExportError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it names files)")
    config = json.loads((merged / "config.json").read_text())
    gguf_arch(config)  # an unsupported architecture is refused before anything is written
    out_dir = Path(out_dir) if out_dir else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    check_room(merged, out_dir, to, quant)
    tok = AutoTokenizer.from_pretrained(merged)
    files: dict[str, Path] = {}
    try:
        if to == "gguf":
            gguf_path = out_dir / f"{name}.gguf"
            info = write_gguf(merged, gguf_path, quant, name=name)
            files["gguf"] = gguf_path
            prompts = probe_prompts(run_dir, tok, templated=info["tokenizer"] == "gpt2")
            check = verify(merged, gguf_path, prompts, quant, info["architecture"], info["tensors"])
            target = gguf_path.name
            if (run_dir / "adapter" / "adapter_model.safetensors").is_file():  # LoRA / QLoRA: the adapter alone too
                lora_path = out_dir / f"{name}-lora.gguf"
                lora = write_lora_gguf(run_dir / "adapter", config, lora_path, name=f"{name}-lora")
                files["lora_gguf"] = lora_path
                back = _read_back(lora_path, info["architecture"], lora["tensors"])
                info["lora"] = {**lora, "read_back": back}
        else:
            folder = out_dir / f"{name}-hf"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(merged, folder)
            files["folder"] = folder
            info, check, target = {"path": str(folder)}, {"copied": True}, folder.name
        num_ctx = min(int(config.get("max_position_embeddings") or 4096), max(2048, int(rec["train_effective"]["seq_len"])))
        text, mf = ollama.modelfile(target, tok, system=ollama.system_prompt_of(run_dir / "dataset" / "test.jsonl"),
                                    num_ctx=num_ctx)
        (out_dir / "Modelfile").write_text(text)
        (out_dir / "README.md").write_text(_readme(name, target, mf["template_family"]))
        files["Modelfile"], files["README"] = out_dir / "Modelfile", out_dir / "README.md"
    except BaseException:
        for p in files.values():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        raise
    entry = {
        "to": to, "quant": quant if to == "gguf" else None, "name": name, "dir": str(out_dir),
        "files": {k: {"path": str(p), **({"bytes": p.stat().st_size, "sha256": sha256_file(p)} if p.is_file() else {})}
                  for k, p in files.items()},
        "writer": info, "verification": check, "modelfile": mf, "seconds": round(time.time() - t0, 2),
        "commands": {"ollama": f"cd {out_dir} && ollama create {name} -f Modelfile && ollama run {name}",
                     "llama.cpp": f"llama-cli -m {out_dir / target} -cnv" if to == "gguf" else None},
        "time": time.time(),
    }
    rec["exported"] = [e for e in rec.get("exported", []) if e.get("files", {}).get("gguf", {}).get("path")
                       != entry["files"].get("gguf", {}).get("path")] + [entry]
    run_files.atomic_json(run_dir / "run.json", rec)
    report.write_report(run_dir / "report.md", rec)
    return entry
