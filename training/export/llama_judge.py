"""llama.cpp judges an exported GGUF: the runtime users load it with (Ollama and LM Studio use the
same llama.cpp code), against the merged Hugging Face model it came from.

The runtime is llama.cpp's prebuilt CPU library as the npm package ``node-llama-cpp`` ships it
(pinned: ``NODE_LLAMA_CPP``; ``make setup`` installs it into ``.venv/duet-llama-cpp`` with
infra/llama_cpp/package-lock.json), driven by training/export/llama_judge.mjs in a child ``node`` process.
What is checked (``judge``):

1. **tokens**: probe texts (digits, contractions, newlines, code, accents, emoji, CJK) and every
   rendered chat prompt tokenize to the same ids in llama.cpp as with the HF tokenizer (special
   tokens parsed, no BOS added: the templates carry their own);
2. **chat template**: llama.cpp's own Jinja engine renders the GGUF's ``tokenizer.chat_template``
   exactly as ``apply_chat_template`` does, on conversations with and without a system message,
   single and multi-turn;
3. **logits**: on held-out prompts (the run's test split through the chat template), transformers'
   greedy continuation (``GREEDY_TOKENS``) of the merged model in fp32; llama.cpp's top-1 at every
   prompt and continuation position agrees with the merged model's (a near tie: llama.cpp's token is
   within ``TIE_LOGITS[quant]`` logits of the merged model's top), at least ``MIN_TOP1[quant]`` of
   positions; llama.cpp's own greedy continuation equals transformers' token for token, or leaves it
   only at a near tie;
4. **LoRA**: the ``-lora.gguf`` applied to the base model's GGUF in llama.cpp agrees with the merged
   model by the same rules.

Without node or node-llama-cpp on the host, ``available()`` says why, and the export says which
check ran instead: never "llama.cpp" for less.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

NODE_LLAMA_CPP = "3.21.1"
GREEDY_TOKENS = 20
TOPK = 5
# Per quantization: a position's top-1 counts as agreeing within this many logits of the merged
# model's top (a near tie), and the minimum share of positions agreeing, exactly or at a near tie.
# Measured (SmolLM2-135M, 3 held-out prompts + 20 greedy tokens, |log p llama.cpp - log p merged| over
# llama.cpp's top 3 tokens, softmax over the whole vocabulary): f16 median 0.002, p99 0.018, max 0.03;
# q8_0 median 0.07, p99 0.58, max 0.63.
# A near tie is a gap inside that noise.
TIE_LOGITS = {"f16": 0.05, "bf16": 0.1, "q8_0": 0.75}
MIN_TOP1 = {"f16": 0.99, "bf16": 0.98, "q8_0": 0.95}
PROBE_TEXTS = [
    "Hello! Tell me something about yourself.",
    "I've got 12345 apples, 3.14159 pies and 1,000,000 ideas; you'll see they're fine.",
    "def f(x):\n    return x**2  # square\n\n\n\ttabbed\r\nline",
    "Café naïve résumé — ünïcödé “quotes” and emoji 🦙🚀 and 中文字符 and Русский текст.",
    "Indented:\n   three spaces, then two  and trailing spaces   ",
]  # no probe starts with a space: there transformers' Metaspace (SentencePiece vocabularies) drops the word-start
#    marker SentencePiece and llama.cpp add; a rendered chat prompt never starts with one
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}],
]


class JudgeError(RuntimeError):
    """llama.cpp disagrees with the merged model (or could not load the file); the message says where."""


def runtime_dir() -> Path | None:
    """The folder whose node_modules holds node-llama-cpp: $DUET_LLAMA_CPP_DIR, else
    ``<venv>/duet-llama-cpp`` (``make setup``)."""
    for d in (os.environ.get("DUET_LLAMA_CPP_DIR"), os.path.join(sys.prefix, "duet-llama-cpp")):
        if d and (Path(d) / "node_modules" / "node-llama-cpp" / "package.json").is_file():
            return Path(d)
    return None


def available() -> tuple[bool, str]:
    """(whether llama.cpp can judge here, why not / what it is)."""
    node = shutil.which("node")
    if node is None:
        return False, "node is not installed (llama.cpp runs through node-llama-cpp)"
    d = runtime_dir()
    if d is None:
        return False, (f"node-llama-cpp is not installed: npm ci --omit=optional --ignore-scripts in a copy of "
                       f"infra/llama_cpp (node-llama-cpp {NODE_LLAMA_CPP}), then set DUET_LLAMA_CPP_DIR to it "
                       "(make setup does this)")
    return True, f"node-llama-cpp in {d}"


def run(request: dict, *, timeout_s: float = 3600) -> dict:
    """One llama_judge.mjs run: the request on stdin, its JSON document back."""
    ok, why = available()
    if not ok:
        raise JudgeError(why)
    threads = int(os.environ.get("DUET_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"}
    try:
        proc = subprocess.run(["node", str(Path(__file__).with_name("llama_judge.mjs")), str(runtime_dir())],
                              input=json.dumps({**request, "threads": threads, "topk": TOPK}), capture_output=True,
                              text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise JudgeError(f"llama.cpp did not answer in {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        said = [ln.removeprefix("[node-llama-cpp] ") for ln in lines if ln.startswith("[node-llama-cpp]")]
        said += [ln for ln in lines if ln.startswith(("Error:", "TypeError:", "RangeError:"))]
        raise JudgeError("llama.cpp could not load or run the file: " + (" | ".join(said or lines[-3:]) or "no output")[:800])
    return json.loads(proc.stdout)


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _top1(rows, tops, tie: float) -> tuple[int, int, list]:
    """(exact agreements, tie-aware agreements, the positions that disagree beyond a tie) of
    llama.cpp's top-1 against the merged model's logit rows."""
    exact = agree = 0
    bad = []
    for i, (row, top) in enumerate(zip(rows, tops)):
        mine = int(row.argmax())
        theirs = int(top[0][0])
        exact += mine == theirs
        gap = float(row[mine] - row[theirs])
        if gap <= tie:
            agree += 1
        else:
            bad.append({"position": i, "merged": mine, "llama_cpp": theirs, "logit_gap": round(gap, 4)})
    return exact, agree, bad


def _greedy(rows, prompt_len: int, hf_gen: list[int], llama_gen: list[int], tie: float) -> dict:
    """How llama.cpp's free greedy continuation compares with transformers': equal, or leaving it at
    a near tie (from there on the two continue different texts, so nothing after counts)."""
    n = _first_difference(hf_gen, llama_gen)
    out = {"tokens": len(hf_gen), "equal_prefix": n, "diverged_at_near_tie": False}
    if n < min(len(hf_gen), len(llama_gen)):
        row = rows[prompt_len - 1 + n]
        gap = float(row[hf_gen[n]] - row[llama_gen[n]])
        out["logit_gap"] = round(gap, 4)
        out["diverged_at_near_tie"] = gap <= tie
    return out


def _noise(rows, tops) -> tuple[float, list[float]]:
    """(the largest |p_llama.cpp - p_merged|, every |log p_llama.cpp - log p_merged|) over llama.cpp's
    top 3 tokens at every position, both softmaxes taken over llama.cpp's top ``TOPK`` tokens (what the
    judge returns; the same tokens on both sides, so neither normalizer is missing)."""
    import math

    import torch

    worst, logs = 0.0, []
    for row, top in zip(rows, tops):
        ids = torch.tensor([int(tid) for tid, _ in top])
        lp = torch.log_softmax(row.double()[ids], -1)
        for k, (_tid, prob) in enumerate(top[:3]):
            worst = max(worst, abs(math.exp(float(lp[k])) - float(prob)))
            if prob > 0:
                logs.append(abs(float(lp[k]) - math.log(float(prob))))
    return worst, logs


def _greedy_continuation(model, ids: list[int], n: int) -> list[int]:
    """The argmax continuation, token by token, with nothing else applied: ``generate`` would apply the
    model's generation_config (SmolLM2's repetition penalty) and hold EOS back under min_new_tokens,
    which llama.cpp's greedy sampling does not."""
    import torch

    out = model(torch.tensor([ids]), use_cache=True)
    gen: list[int] = []
    while True:
        nxt = int(out.logits[0, -1].argmax())
        gen.append(nxt)
        if len(gen) == n:
            return gen
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)


def merged_reference(merged: Path, conversations: list[list[dict]], *, max_prompt: int = 384) -> dict:
    """The merged model's side, once for every check: the tokenizer's ids and renderings, each held-out
    prompt's greedy continuation and the fp32 logits over prompt + continuation. A held-out system
    turn is folded into the first user turn where the template has no system role, as in training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data.dataset import for_template

    tok = AutoTokenizer.from_pretrained(merged)
    has_template = bool(getattr(tok, "chat_template", None))
    conversations = [for_template(tok, c) for c in conversations]  # as the model's template takes them
    rendered = []
    for conv in PROBE_CONVERSATIONS + conversations:
        try:
            rendered.append(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                            if has_template else None)
        except Exception as exc:  # a template that refuses a conversation (Gemma 2: no system role)
            rendered.append({"error": str(exc)[:300]})
    prompts = [r for r in rendered[len(PROBE_CONVERSATIONS):] if isinstance(r, str)] if has_template else \
        ["\n".join(m["content"] for m in c) for c in conversations]
    prompts = (prompts or PROBE_TEXTS[:1])[:3]
    texts = PROBE_TEXTS + [r for r in rendered if isinstance(r, str)]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    sequences = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, add_special_tokens=not has_template)["input_ids"][-max_prompt:]
            gen = _greedy_continuation(model, ids, GREEDY_TOKENS)
            full = ids + gen
            logits = model(torch.tensor([full])).logits[0].float()
            sequences.append({"ids": full, "prompt": len(ids), "generate": len(gen), "gen": gen, "logits": logits})
    del model
    return {"tokenizer": tok, "template": tok.chat_template if has_template else None, "rendered": rendered,
            "conversations": PROBE_CONVERSATIONS + conversations,
            "texts": texts, "text_ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            "sequences": sequences}


def judge(gguf_path: Path, ref: dict, quant: str, *, template: str | None, lora: dict | None = None) -> dict:
    """llama.cpp against the merged model (``merged_reference``); raises JudgeError naming the first
    disagreement. ``template``: the chat template stored in the GGUF. ``lora``: {"adapter", "base",
    "quant"} to check the adapter file on the base model's GGUF too."""
    tok = ref["tokenizer"]
    seqs = ref["sequences"]
    conversations = ref["conversations"]
    req = {"model": str(gguf_path), "texts": ref["texts"],
           "sequences": [{"ids": s["ids"], "prompt": s["prompt"], "generate": s["generate"]} for s in seqs]}
    if template:
        convs = [c for c, r in zip(conversations, ref["rendered"]) if c is not None and isinstance(r, str)]
        req["chat"] = {"template": template, "bos": tok.bos_token or "", "eos": tok.eos_token or "",
                       "conversations": convs}
    if lora:
        req["lora"] = {"base": str(lora["base"]), "adapter": str(lora["adapter"])}
    got = run(req)
    out = {"judge": f"llama.cpp {got.get('llama_cpp')} (node-llama-cpp {got.get('node_llama_cpp')}, CPU)"}
    # 1. tokens
    for text, mine, theirs in zip(ref["texts"], ref["text_ids"], got["tokens"]):
        if mine != theirs:
            i = _first_difference(mine, theirs)
            raise JudgeError(f"llama.cpp tokenizes {text[:60]!r}... differently from the model's tokenizer "
                             f"(first difference at token {i}: {mine[i:i + 4]} vs {theirs[i:i + 4]}; "
                             f"{tok.convert_ids_to_tokens(mine[i:i + 4])} vs {tok.convert_ids_to_tokens(theirs[i:i + 4])})")
    out["tokenizer_ids_equal"] = {"texts": len(ref["texts"]), "tokens": sum(len(t) for t in ref["text_ids"])}
    # 2. the chat template
    if template:
        want = [r for c, r in zip(conversations, ref["rendered"]) if c is not None and isinstance(r, str)]
        for conv, mine, theirs in zip(req["chat"]["conversations"], want, got["rendered"]):
            if mine != theirs:
                err = theirs.get("error") if isinstance(theirs, dict) else None
                raise JudgeError("llama.cpp's Jinja engine renders the chat template differently from "
                                 f"apply_chat_template for {[m['role'] for m in conv]}: "
                                 + (f"it fails: {err}" if err else f"{mine[-80:]!r} vs {theirs[-80:]!r}"))
        out["chat_template_equal"] = len(want)
    # 3. logits: top-1 at every position, and the greedy continuation
    out.update(_agreement(seqs, got["sequences"], quant, "model"))
    if lora:
        out["lora"] = _agreement(seqs, got["lora"], lora["quant"], "LoRA adapter on the base GGUF")
    return out


def _agreement(seqs: list[dict], runs: list[dict], quant: str, what: str) -> dict:
    tie, need = TIE_LOGITS[quant], MIN_TOP1[quant]
    positions = exact = agree = 0
    greedy, bad, gap, logs = [], [], 0.0, []
    for s, r in zip(seqs, runs):
        rows = s["logits"]
        e, a, b = _top1(rows, r["top"], tie)
        positions, exact, agree = positions + len(rows), exact + e, agree + a
        bad += b
        g, lg = _noise(rows, r["top"])
        gap, logs = max(gap, g), logs + lg
        if r.get("greedy"):
            g = _greedy(rows, s["prompt"], s["gen"], r["greedy"], tie)
            greedy.append(g)
            if g["equal_prefix"] < g["tokens"] and not g["diverged_at_near_tie"]:
                raise JudgeError(f"{what}: llama.cpp's greedy continuation leaves the merged model's at token "
                                 f"{g['equal_prefix'] + 1} of {g['tokens']} (logit gap {g['logit_gap']}, more "
                                 f"than a near tie of {tie})")
    top1 = agree / max(1, positions)
    res = {"prompts": len(seqs), "positions": positions, "top1_agreement": round(top1, 4),
           "top1_exact": round(exact / max(1, positions), 4), "tie_logits": tie, "min_top1": need,
           "max_probability_gap": round(gap, 5), "greedy": greedy, "disagreements": bad[:5]}
    if logs:
        logs.sort()
        res["logprob_noise"] = {"median": round(logs[len(logs) // 2], 5), "p99": round(logs[int(len(logs) * 0.99)], 5),
                                "max": round(logs[-1], 5)}
    if top1 < need:
        raise JudgeError(f"{what}: llama.cpp's top-1 agrees with the merged model's at {top1:.3f} of {positions} "
                         f"positions (at least {need}); first: {bad[:2]}")
    return res
