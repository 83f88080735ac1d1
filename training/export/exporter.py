"""``duet export``: a finished run's merged model -> ``<name>.gguf`` + ``Modelfile`` + README.md, verified.

- The model GGUF is written by llama.cpp's own converter (training/export/gguf_convert.py); a LoRA or
  QLoRA run's adapter also becomes ``<name>-lora.gguf`` (training/export/gguf_write.py).
- The export is reported done only after verification, by the runtime users load it with:
  llama.cpp itself (training/export/llama_judge.py: tokens, the chat template through llama.cpp's Jinja
  engine, prompt top-1 and greedy continuations against the merged model, the LoRA file on the base
  model's GGUF). Where llama.cpp is not installed on the executor host, transformers' GGUF reload
  checks the file instead, and run.json, report.md and the CLI say so (``verification.judge``).
- The Modelfile's TEMPLATE is the family's Ollama template, checked against ``apply_chat_template``
  (training/export/ollama.py).

A failed verification deletes the files and says why. The run record (run.json, report.md) gains an
``exported`` entry (paths, sizes, sha256, verification, the Modelfile's decisions). The architect
commits that record to the workspace and adds a cortex fact.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from training.export import gguf_convert, llama_judge
from training.data.dataset import sha256_file  # noqa: F401  (tests and the CLI check files with it)
from training.export.gguf_write import ExportError, tensor_shapes, write_lora_gguf

QUANTS = gguf_convert.QUANTS
# The fallback check without llama.cpp (transformers' GGUF reload): (minimum top-1 agreement, maximum
# mean KL(merged || gguf) a token). Measured on this CPU: f16 KL 3e-6, q8_0 1.2e-3 to 2.5e-3 (SmolLM2).
BOUNDS = {"f16": (0.99, 1e-3), "bf16": (0.97, 5e-3), "q8_0": (0.90, 2e-2)}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HELD_OUT = 3  # held-out conversations the judge runs


def expected_bytes(folder: Path, quant: str) -> int:
    """What the GGUF will take on disk, from the safetensors headers (plus room for the vocabulary)."""
    per = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[quant]
    return int(sum(math.prod(s) * (4 if len(s) == 1 else per) for s in tensor_shapes(folder))) + 32 * 2**20


def verify_ram_bytes(folder: Path) -> float:
    """RAM the verification needs: one fp32 copy of the model (the merged model, then the GGUF in
    llama.cpp or transformers, one after the other), plus a quarter for the activations and the
    loaders' temporaries, plus the runtime."""
    return sum(math.prod(s) for s in tensor_shapes(folder)) * 4 * 1.25 + 512 * 2**20


def held_out_conversations(run_dir: Path, n: int = HELD_OUT) -> list[list[dict]]:
    """The test split's conversations without their last answer (DPO: the prompt)."""
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
        if msgs:
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return out



def _read_back(path: Path, arch: str) -> dict:
    from training.export.gguf_read import read_header

    r = read_header(path)
    got_arch = r.fields.get("general.architecture")
    if got_arch != arch:
        raise ExportError(f"{path.name}: read back architecture {got_arch!r}, expected {arch!r}")
    for tname, shape, _ in r.tensors:
        if any(int(d) <= 0 for d in shape):
            raise ExportError(f"{path.name}: tensor {tname} has shape {list(shape)}")
    return {"architecture": got_arch, "tensors": len(r.tensors), "metadata_keys": len(r.fields),
            "chat_template": r.fields.get("tokenizer.chat_template")}


def transformers_reload(merged: Path, gguf_path: Path, prompts: list[str], quant: str) -> dict:
    """The check without llama.cpp: transformers' GGUF loader reloads the tokenizer and the model;
    the ids and fp32 logits are compared with the merged model's (``BOUNDS``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(merged)
    try:
        g_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32).eval()
    except Exception as exc:  # an architecture transformers' GGUF loader does not read
        return {"judge": "read back only (llama.cpp is not installed here and transformers cannot reload "
                         f"this architecture: {str(exc)[:200]})"}
    enc = []
    for p in prompts:
        a, b = ref_tok(p)["input_ids"][:256], g_tok(p)["input_ids"][:256]
        if a != b:
            raise ExportError("the GGUF's tokenizer splits a held-out prompt differently from the merged model's")
        enc.append(torch.tensor([a]))
    with torch.no_grad():
        got = [model(x).logits[0].float() for x in enc]
    del model
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = [model(x).logits[0].float() for x in enc]
    del model
    positions = sum(r.shape[0] for r in ref)
    tie = llama_judge.TIE_LOGITS[quant]  # a near tie, as llama.cpp's check counts one
    agree = sum(int((r.max(-1).values - r.gather(-1, g.argmax(-1, keepdim=True)).squeeze(-1) <= tie).sum())
                for r, g in zip(ref, got))
    kl = sum(float(torch.nn.functional.kl_div(g.log_softmax(-1), r.log_softmax(-1), log_target=True,
                                              reduction="sum")) for r, g in zip(ref, got)) / positions
    min_top1, max_kl = BOUNDS[quant]
    if agree / positions < min_top1 or kl > max_kl:
        raise ExportError(f"the GGUF's logits drift from the merged model's: top-1 agreement {agree / positions:.3f} "
                          f"(at least {min_top1}), mean KL {kl:.2e} (at most {max_kl:.0e})")
    return {"judge": "transformers' GGUF reload (not llama.cpp)", "prompts": len(prompts), "positions": positions,
            "top1_agreement": round(agree / positions, 4), "kl_mean": kl, "tokenizer_ids_equal": True,
            "bounds": {"min_top1": min_top1, "max_kl_mean": max_kl}}


def verify(run_dir: Path, merged: Path, gguf_path: Path, quant: str, arch: str, *, lora_path: Path | None,
           base: Path | None, out_dir: Path, name: str) -> dict:
    """llama.cpp judges the file (and the LoRA file on the base model's GGUF) where it is installed;
    else transformers' reload. The result names which check ran (``judge``)."""
    back = _read_back(gguf_path, arch)
    convs = held_out_conversations(run_dir)
    ok, why = llama_judge.available()
    if not ok:
        prompts = ["\n".join(m["content"] for m in c) for c in convs] or llama_judge.PROBE_TEXTS[:2]
        res = transformers_reload(merged, gguf_path, prompts, quant)
        back.pop("chat_template")
        return {**back, **res, "llama_cpp": f"not run: {why}"}
    ref = llama_judge.merged_reference(merged, convs)
    lora = None
    if lora_path is not None and base is not None:
        base_gguf = out_dir / f".{name}-base-f16.gguf.check"
        gguf_convert.convert(base, base_gguf, "f16", name=f"{name}-base")
        # The reference is the merged model: W + BA rounded in the merge's dtype. llama.cpp adds the adapter at
        # run time to the f16 base, unrounded, so the two differ by the merge's rounding: its near tie is that
        # dtype's (a bf16 merge of Gemma 3 moved a top-1 gap to 0.0998 on an AMX CPU).
        cfg = json.loads((merged / "config.json").read_text())
        merged_dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
        lora = {"adapter": lora_path, "base": base_gguf, "quant": "bf16" if "bfloat16" in merged_dtype else "f16"}
    try:
        res = llama_judge.judge(gguf_path, ref, quant, template=back["chat_template"], lora=lora)
    except llama_judge.JudgeError as exc:
        raise ExportError(f"llama.cpp does not agree with the merged model: {exc}") from exc
    finally:
        if lora:
            lora["base"].unlink(missing_ok=True)
    back.pop("chat_template")
    return {**back, **res}


def _readme(name: str, gguf_name: str, family: str | None, judge: str) -> str:
    lines = [f"# {name}", "", f"Exported by `duet export`; checked against the merged model by {judge}.", "",
             "Ollama:", "", "```", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
             "llama.cpp:", "", "```", f"llama-cli -m {gguf_name} -cnv", "```", ""]
    if family is None:
        lines += ["The Modelfile has no TEMPLATE: Ollama uses the chat template stored in the GGUF.", ""]
    return "\n".join(lines)


def check_room(merged: Path, out_dir: Path, to: str, quant: str, *, lora_base: Path | None = None) -> None:
    """Before anything is written: the disk holds the file (and the base model's f16 GGUF the LoRA
    check loads, deleted after), and RAM holds the verification (one fp32 copy)."""
    import psutil

    need = expected_bytes(merged, quant) if to == "gguf" else sum(f.stat().st_size for f in merged.iterdir())
    if to == "gguf" and lora_base is not None:
        need += expected_bytes(lora_base, "f16")
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise ExportError(f"{out_dir}: {free / 2**30:.2f} GiB free, the export needs about {need / 2**30:.2f} GiB")
    if to == "gguf":
        ram, avail = int(verify_ram_bytes(merged)), psutil.virtual_memory().available
        if ram > avail:
            raise ExportError(f"verifying the export loads the model in fp32: about {ram / 2**30:.1f} GiB of RAM, "
                              f"{avail / 2**30:.1f} GiB available; free memory (stop the training?) and retry")


def _lora_base(run_dir: Path, rec: dict) -> Path | None:
    """The 16/32-bit folder the adapter was trained on (what ``--lora`` goes on top of)."""
    init_from = (rec.get("model") or {}).get("init_from")
    if init_from and rec.get("phase") == "sft":
        p = run_dir.parent / init_from / "merged"
    else:
        p = Path(rec.get("model_path") or "")
    return p if (p / "config.json").is_file() else None


def check_out_dir(run_dir: Path, out_dir: Path) -> Path:
    """Where an export may write: a folder (or none yet), never a file, never inside the run's own
    folders (its model, adapter, checkpoints, dataset) but its ``export/``. ExportError saying why."""
    real, rd = out_dir.resolve(), run_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"-o {out_dir}: a file, not a folder; give a folder to write the export into")
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"-o {out_dir}: {parent} is a file, so the folder cannot be made there")
    allowed = (rd / "export").resolve()
    inside_run = real == rd or rd in real.parents
    if inside_run and not (real == allowed or allowed in real.parents):
        where = (real.relative_to(rd).parts or ("the run's own folder",))[0]
        raise ExportError(f"-o {out_dir}: that is inside run {rd.name} ({where}), which the export reads or keeps; "
                          f"give a folder outside the run, or leave -o out (the export goes to {rd / 'export'})")
    return out_dir


def export_run(run_dir: Path, *, to: str = "gguf", quant: str = "f16", name: str | None = None,
               out_dir: Path | None = None) -> dict:
    """Export a finished run whose merged model exists (the caller merges first when it does not).
    Returns the ``exported`` entry, also appended to run.json and shown in report.md."""
    from transformers import AutoTokenizer

    from training.export import ollama

    from training.run import report, run_files

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
    name = name or rec["run_id"]
    if not NAME.fullmatch(name):
        raise ExportError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it names files)")
    config = json.loads((merged / "config.json").read_text())
    _mt, arch = gguf_convert.family(config)  # an unsupported family is refused before anything is written
    out_dir = check_out_dir(run_dir, Path(out_dir) if out_dir else run_dir / "export")
    tensor_shapes(merged)  # every safetensors header checked (a damaged one named) before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = run_dir / "adapter"
    has_adapter = (adapter / "adapter_model.safetensors").is_file()
    base = _lora_base(run_dir, rec) if has_adapter and llama_judge.available()[0] else None
    check_room(merged, out_dir, to, quant, lora_base=base)
    tok = AutoTokenizer.from_pretrained(merged)
    files: dict[str, Path] = {}
    try:
        if to == "gguf":
            gguf_path = out_dir / f"{name}.gguf"
            info = gguf_convert.convert(merged, gguf_path, quant, name=name)
            files["gguf"] = gguf_path
            lora_path = None
            if has_adapter:  # LoRA / QLoRA: the adapter alone too
                lora_path = out_dir / f"{name}-lora.gguf"
                info["lora"] = write_lora_gguf(adapter, config, lora_path, name=f"{name}-lora", arch=arch)
                files["lora_gguf"] = lora_path
            check = verify(run_dir, merged, gguf_path, quant, arch, lora_path=lora_path, base=base, out_dir=out_dir,
                           name=name)
            target = gguf_path.name
        else:
            folder = out_dir / f"{name}-hf"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(merged, folder)
            files["folder"] = folder
            info, check, target = {"path": str(folder)}, {"copied": True, "judge": "a copy of the merged model"}, \
                folder.name
        num_ctx = min(int(config.get("max_position_embeddings") or 4096), max(2048, int(rec["train_effective"]["seq_len"])))
        text, mf = ollama.modelfile(target, tok, system=ollama.system_prompt_of(run_dir / "dataset" / "test.jsonl"),
                                    num_ctx=num_ctx)
        (out_dir / "Modelfile").write_text(text)
        (out_dir / "README.md").write_text(_readme(name, target, mf["template_family"], check["judge"]))
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

