"""The end of a run: merge the adapter into its base, verify the merged model (merge_check.py), and
generate samples from it. A full fine-tune has no adapter: its trained weights are the model."""

from __future__ import annotations

from pathlib import Path

from training.run.model_load import load_train_model
from training.run.phases import release_memory
from infra.lazy import lazy

torch = lazy("torch", extra="executor")


def _probe(run, tok) -> tuple[list, list, list]:
    """(test records, prompts, references) of the test split, for the merge check and samples; each
    prompt as the chat template takes it (training/data/dataset.for_template)."""
    from training.data.dataset import for_template, load_split, prompt_and_reference

    test = load_split(run.dir / "dataset", "test")
    pairs = [prompt_and_reference(r) for r in test]
    return test, [for_template(tok, p) for p, _ in pairs], [ref for _, ref in pairs]


def _nf4_logits(run, base_path: Path, enc: list) -> list:
    """Logits of the model as QLoRA trained it: loaded the way training loaded it (the nf4 base, the
    trained adapter on top), fp32 logits on the CPU."""
    model = load_train_model(base_path, run.train_cfg, device=run.device, dtype=run.dtype,
                             adapter=run.dir / "adapter")
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = [model(**{k: v.to(dev) for k, v in e.items()}).logits.float().cpu() for e in enc]
    del model
    release_memory()
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def keep_base_tokenizer(base: Path, merged_dir: Path) -> list[str]:
    """The merged folder carries the base model's own tokenizer files, byte for byte (what was
    re-saved is replaced): a re-save drops ``tokenizer.model`` and the special flags that
    llama.cpp's converter reads, and the tokenizer never changes in training. Returns the files copied."""
    import shutil

    base = Path(base)
    if not (base / "tokenizer.json").is_file() and not (base / "tokenizer.model").is_file():
        return []
    for name in TOKENIZER_FILES:
        (merged_dir / name).unlink(missing_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, merged_dir / name)
            copied.append(name)
    return copied


def merge_and_evaluate(run, model_path: Path) -> None:
    """Merge the adapter into the 16/32-bit base (never the 4-bit weights) on the GPU when it fits,
    else on the CPU after checking free RAM; verify the merged model against adapter+base with a
    dtype-aware criterion (training/run/merge_check.py); for QLoRA measure the drift from the nf4
    model as trained; save with safetensors; generate samples. A full fine-tune has no adapter:
    its trained weights are the model (saved by the training) and only the samples are made.

    Long because the merge, its check and the samples share the models it loads once."""
    import psutil
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.run import merge_check

    run.enter_phase("merge")
    full = run.train_cfg.method == "full"
    src = run.dir / ("merged" if full else "adapter")
    tok = AutoTokenizer.from_pretrained(src)
    dtype = run.torch_dtype_of_run()
    base_path = src if full else run.base_path(model_path)
    weights = sum(f.stat().st_size for f in Path(base_path).glob("*.safetensors"))
    need = int(weights * (2 if dtype == torch.float32 else 1) * 1.2)  # stored width -> load width, + merge slack
    device = "cpu"
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        if need < free * 0.9:
            device = "cuda"
    if device == "cpu" and need > psutil.virtual_memory().available:
        raise RuntimeError(f"merge needs ~{need / 2**30:.1f} GiB; free RAM is "
                           f"{psutil.virtual_memory().available / 2**30:.1f} GiB and the GPU has no room")
    test, prompts, refs = _probe(run, tok)
    probe = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[:2]]
    enc = [tok(t, return_tensors="pt") for t in probe]
    if full:
        keep_base_tokenizer(run.base_path(model_path), src)
        merged = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        merged.eval()
        run.result["merged_model"] = {"path": str(src), "device": device, "dtype": str(dtype).replace("torch.", ""),
                                       "verified": "full fine-tune: the trained weights are the model (no merge)"}
        run.emit("merged", path=str(src), device=device, full=True)
    else:
        drift_ref = _nf4_logits(run, base_path, enc) if run.train_cfg.method == "qlora" else None
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
        model = PeftModel.from_pretrained(base, run.dir / "adapter").to(device)
        model.eval()
        enc_d = [{k: v.to(device) for k, v in e.items()} for e in enc]
        with torch.no_grad():
            ref = [model(**e).logits.float().cpu() for e in enc_d]
            with model.disable_adapter():
                base_out = [model(**e).logits.float().cpu() for e in enc_d]
            merged = model.merge_and_unload()
            got = [merged(**e).logits.float().cpu() for e in enc_d]
        check = merge_check.compare(ref, got, run.dtype)
        effect = merge_check.compare(ref, base_out, run.dtype)
        ok, why = merge_check.judge(run.dtype, check, effect)
        if not ok:
            raise RuntimeError(f"merge verification failed: {why}")
        merged_dir = run.dir / "merged"
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tok.save_pretrained(merged_dir)
        keep_base_tokenizer(base_path, merged_dir)
        run.result["merged_model"] = {
            "path": str(merged_dir), "logit_max_abs_diff": check["max_abs"], "device": device,
            "dtype": str(dtype).replace("torch.", ""), "verified_prompts": len(enc), "verification": check,
            "adapter_effect": effect, "criterion": why}
        if drift_ref is not None:
            drift = merge_check.compare(drift_ref, got)
            drift["note"] = ("the adapter was trained on the nf4 base; this is the merged 16-bit model against "
                             "the nf4 model + adapter as trained (reported, not judged)")
            run.result["merged_model"]["qlora_drift"] = drift
        run.emit("merged", path=str(merged_dir), logit_max_abs_diff=check["max_abs"], device=device,
                  kl_mean=check["kl_mean"], top1_agreement=check["top1_agreement"])
        del model, base
    run.enter_phase("sampling")
    samples = []
    n = run.train_cfg.sample_prompts
    for rec, p, reference in list(zip(test, prompts, refs))[:n]:
        text = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        e = tok(text, return_tensors="pt").to(device)
        with torch.no_grad():
            out = merged.generate(**e, max_new_tokens=run.train_cfg.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id or tok.eos_token_id)
        gen = tok.decode(out[0, e["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        samples.append({"id": rec["id"], "prompt": p[-1]["content"], "reference": reference, "generated": gen})
    run.result["samples"] = samples
    run.emit("samples", count=len(samples))
    del merged
    release_memory()
