"""Which model a name means, what loading it for chat costs, and loading it.

Names are relative to the run being tried:

- ``RUN``: what that run trained. A finished LoRA run: its merged model (base + adapter for a run
  stopped before the merge); QLoRA: the 4-bit base with the adapter, as it was trained; a full
  fine-tune: its weights. A run still training: its newest valid checkpoint.
- ``RUN@STEP``: the checkpoint of that step (``RUN@latest``: the newest valid one).
- ``base``: the model the tried run started from (for ``RUN@base``: that run's).

The estimate (``inference_bytes``) is the memory model's for inference, beside training's: the
weights at their load width, the KV cache for the context asked, the logits of a step, and the
process (the CUDA context on a GPU). Nothing here writes to a run.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from training.config import PlanError, check_run_id
from training.plan.memory_model import CUDA_CONTEXT_BYTES, DTYPE_BYTES, NF4_DQ_BYTES, ModelProfile
from training.run import checkpoints
from training.run.engine import base_path

DEFAULTS = {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256, "seed": 0}
LIMITS = {"temperature": (0.0, 5.0), "top_p": (0.01, 1.0), "max_tokens": (1, 4096), "seed": (0, 2**31 - 1)}
MAX_MESSAGES = 200
MAX_CHARS = 200_000     # a conversation's characters, all messages together
ROLES = ("system", "user", "assistant")
_NAME = re.compile(r"^(base|[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@(base|latest|[0-9]{1,9}))?)$")


class ServeError(ValueError):
    """Bad input: an unknown model name, a malformed conversation or setting (exit 1)."""


class ServeRefused(RuntimeError):
    """The model does not fit where it would be served (exit 2); ``breakdown`` says why. Both are its
    args, so it crosses a process boundary (Ray pickles an actor's error) whole."""

    def __init__(self, message: str, breakdown: dict):
        super().__init__(message, breakdown)
        self.breakdown = breakdown

    def __str__(self) -> str:
        return str(self.args[0])


def check_settings(raw: object) -> dict:
    """The sampling settings, every one explicit: the defaults filled in, each checked against LIMITS
    (temperature 0 means greedy decoding)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ServeError("settings: expected an object with temperature, top_p, max_tokens, seed")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ServeError(f"settings: unknown field {unknown[0]!r}; allowed: {', '.join(DEFAULTS)}")
    out = {}
    for key, default in DEFAULTS.items():
        v = raw.get(key, default)
        lo, hi = LIMITS[key]
        whole = isinstance(default, int)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (whole and not isinstance(v, int)) \
                or not math.isfinite(v) or not lo <= v <= hi:
            kind = "a whole number" if whole else "a number"
            raise ServeError(f"settings field {key!r}: {v!r} is not {kind} in [{lo}, {hi}]")
        out[key] = int(v) if whole else float(v)
    return out


def check_messages(raw: object) -> list[dict]:
    """A conversation: 1..MAX_MESSAGES messages of {role: system|user|assistant, content: text},
    ending with the user's, at most MAX_CHARS characters in all."""
    if not isinstance(raw, list) or not raw:
        raise ServeError("messages: expected a non-empty list of {role, content}")
    if len(raw) > MAX_MESSAGES:
        raise ServeError(f"messages: {len(raw)} messages; at most {MAX_MESSAGES}")
    out, chars = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - {"role", "content"}:
            raise ServeError(f"messages[{i}]: expected exactly the fields role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ServeError(f"messages[{i}].role: {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip() or "\x00" in content:
            raise ServeError(f"messages[{i}].content: expected non-empty text")
        if role == "system" and i:
            raise ServeError(f"messages[{i}]: a system message comes first")
        chars += len(content)
        out.append({"role": role, "content": content})
    if chars > MAX_CHARS:
        raise ServeError(f"messages: {chars} characters; at most {MAX_CHARS}")
    if out[-1]["role"] != "user":
        raise ServeError("messages: the last message must be the user's")
    return out


def _record(rdir: Path) -> tuple[dict, dict]:
    """(run.json, the plan in spec.json) of a run folder; ServeError when either cannot be read."""
    from training.run.run_files import read_json

    rec, spec = read_json(rdir / "run.json"), read_json(rdir / "spec.json")
    if not isinstance(rec, dict) or not isinstance(spec, dict):
        raise ServeError(f"run {rdir.name}: its record (run.json, spec.json) cannot be read")
    return rec, spec.get("plan") or {}


def run_of(run_id: str, name: str) -> str:
    """The run that holds model ``name`` tried beside ``run_id`` (its executor is the one to ask)."""
    return run_id if name == "base" else str(name).partition("@")[0]


def resolve(data_dir: str | os.PathLike, run_id: str, name: str) -> dict:
    """``name`` (see the module's docstring), tried beside ``run_id`` -> what to load: the ``ref`` it
    was resolved to, the base folder, the adapter folder or None, whether the weights are the model's
    own (merged/full), the method, dtype and device of the run's plan."""
    data_dir = Path(data_dir)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ServeError(f"model {name!r}: give base, RUN, RUN@STEP, RUN@latest or RUN@base")
    try:
        check_run_id(run_id)
    except PlanError as exc:
        raise ServeError(str(exc)) from None
    rid, _, at = (run_id, "@", "base") if name == "base" else name.partition("@")
    rdir = data_dir / "runs" / rid
    if not (rdir / "spec.json").is_file():
        raise ServeError(f"no run {rid!r} on this executor ({data_dir / 'runs'})")
    rec, plan = _record(rdir)
    train = plan.get("train") or {}
    method, phase = train.get("method", "lora"), train.get("phase", "sft")
    if not rec.get("model_path") and not (train.get("init_from") and phase == "sft"):
        raise ServeError(f"run {rid} has no base model yet (its pre-flight has not run)")
    base = base_path(data_dir / "runs", train.get("init_from"), phase, Path(rec.get("model_path") or "."))
    out = {"run_id": rid, "method": method, "dtype": plan.get("dtype", "fp32"), "device": plan.get("device", "cpu"),
           "base": str(base), "adapter": None, "own_weights": False, "step": None, "lora": train.get("lora") or {}}
    ckpts = rdir / "checkpoints"
    if at == "base":
        return {**out, "ref": f"{rid}@base" if name != "base" else "base", "kind": "base"}
    if at == "" and rec.get("status") == "finished":
        if method == "full":
            return {**out, "ref": rid, "kind": "trained", "base": str(rdir / "merged"), "own_weights": True}
        if method != "qlora" and (rdir / "merged" / "config.json").is_file():
            return {**out, "ref": rid, "kind": "trained", "base": str(rdir / "merged"), "own_weights": True}
        if (rdir / "adapter" / "adapter_config.json").is_file():
            return {**out, "ref": rid, "kind": "trained", "adapter": str(rdir / "adapter")}
    if at in ("", "latest"):
        ck = checkpoints.newest_valid(ckpts) if ckpts.is_dir() else None
        if ck is None:
            raise ServeError(f"run {rid} ({rec.get('status')}) has no trained model or valid checkpoint yet")
    else:
        ck = ckpts / f"checkpoint-{int(at)}"
        if not checkpoints.is_valid(ck):
            have = [str(checkpoints.step_of(p)) for p in checkpoints.listing(ckpts)] if ckpts.is_dir() else []
            raise ServeError(f"run {rid} has no valid checkpoint at step {int(at)}; steps: {', '.join(have) or 'none'}")
    step = checkpoints.step_of(ck)
    if method == "full":
        return {**out, "ref": f"{rid}@{step}", "kind": "checkpoint", "step": step, "base": str(ck), "own_weights": True}
    return {**out, "ref": f"{rid}@{step}", "kind": "checkpoint", "step": step, "adapter": str(ck)}


LOGITS_TOKENS = 1                              # generate() computes the last position's logits only


SERVE_RUNTIME_CPU = 64 * 2**20    # generate's own allocations and imports in an executor that already holds torch


def inference_bytes(ref: dict, context_tokens: int) -> dict[str, int]:
    """The memory model's inference estimate, bytes: the weights at their load width, the adapter, the
    KV cache for ``context_tokens``, a step's logits, the process (the CUDA context on a GPU), and on
    the CPU the load's transient: the stored files, mapped while their tensors are copied to the load
    width (measured on SmolLM2's fp32 file loaded in bf16: peak 870 MB, 359 MB after; benchmarks/serve.py).
    ``inference_total`` says how they add up."""
    from training.config import LoraSettings

    try:
        prof = ModelProfile.from_config(Path(ref["base"]))
    except PlanError as exc:
        raise ServeError(str(exc)) from None
    width = DTYPE_BYTES[ref["dtype"]]
    if ref["method"] == "qlora" and not ref["own_weights"]:  # as memory_model.estimate splits them
        emb = prof.embedding_params + prof.hidden
        weights = int((prof.params - emb) * NF4_DQ_BYTES) + emb * width
    else:
        weights = prof.params * width
    adapter = prof.lora_params(LoraSettings.model_validate(ref["lora"])) * 4 if ref["adapter"] else 0
    stored = sum(f.stat().st_size for f in Path(ref["base"]).glob("*.safetensors"))
    if ref["adapter"]:
        stored += sum(f.stat().st_size for f in Path(ref["adapter"]).glob("adapter_model.safetensors"))
    kv = 2 * prof.layers * prof.kv_heads * prof.head_dim * context_tokens * width
    return {"weights": weights, "adapter": adapter, "kv_cache": kv,
            "logits": LOGITS_TOKENS * prof.vocab * 4 * 2,
            "runtime": CUDA_CONTEXT_BYTES if ref["device"] == "cuda" else SERVE_RUNTIME_CPU,
            "load_transient": stored if ref["device"] != "cuda" else 0}


def inference_total(b: dict[str, int]) -> int:
    """The peak of serving: the weights, the adapter and the process always; then the larger of the
    load's transient and what answering holds (the KV cache and the logits), which come after it."""
    return b["weights"] + b["adapter"] + b["runtime"] + max(b["load_transient"], b["kv_cache"] + b["logits"])


def resident_bytes(b: dict[str, int]) -> int:
    """What a loaded model keeps between answers (the process's own memory is counted once, apart)."""
    return b["weights"] + b["adapter"] + b["logits"]


def load(ref: dict):
    """(model, tokenizer) for ``ref``, in eval mode on the run's device, in the plan's dtype; QLoRA in 4-bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.run.model_load import load_nf4, torch_dtype

    if ref["method"] == "qlora" and not ref["own_weights"]:
        model = load_nf4(Path(ref["base"]), ref["dtype"], ref["device"])
    else:
        model = AutoModelForCausalLM.from_pretrained(ref["base"], dtype=torch_dtype(ref["dtype"]))
        if ref["device"] == "cuda":
            model = model.to("cuda")
    if ref["adapter"]:
        model = PeftModel.from_pretrained(model, ref["adapter"])
    model.eval()
    tok_dir = ref["adapter"] if ref["adapter"] and (Path(ref["adapter"]) / "tokenizer_config.json").is_file() \
        else ref["base"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return model, tok
