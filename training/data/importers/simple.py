"""Record formats that are already one record an item: chat JSONL, ShareGPT, Alpaca, DPO pairs.

Their text is taken as it is (these files are datasets, not exports); ``duet data check`` reports
what does not follow the rules.
"""

from __future__ import annotations

import hashlib
import json

from training.data.importers.source import ImportFormatError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_call": "tool_call", "observation": "tool", "function": "tool"}


def stable_id(prefix: str, obj: object) -> str:
    return f"{prefix}-{hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]}"


def _meta(obj: dict, source: str) -> dict:
    meta = dict(obj.get("metadata") or {}) if isinstance(obj.get("metadata"), dict) else {}
    meta.setdefault("source", source)
    return meta


def _id(obj: dict, prefix: str, content: object) -> str:
    rid = obj.get("id")
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
        return str(rid)
    return stable_id(prefix, content)


def chat(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ImportFormatError("expected an object with a 'messages' list")
    msgs = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in obj["messages"]]
    return [{"id": _id(obj, "chat", msgs), "messages": msgs, "metadata": _meta(obj, source)}]


def sharegpt(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise ImportFormatError("expected an object with a 'conversations' list")
    msgs = []
    for i, turn in enumerate(obj["conversations"]):
        if not isinstance(turn, dict):
            raise ImportFormatError(f"conversations[{i}]: expected an object with from/value")
        who = str(turn.get("from", "")).lower()
        if who not in SHAREGPT_ROLES:
            raise ImportFormatError(f"conversations[{i}].from: {turn.get('from')!r} is not one of "
                                    f"{', '.join(sorted(SHAREGPT_ROLES))}")
        role = SHAREGPT_ROLES[who]
        value = turn.get("value")
        if role == "tool_call":  # ShareGPT's function calls are the assistant's
            role, value = "assistant", f"<tool_call>\n{value}\n</tool_call>"
        msgs.append({"role": role, "content": value})
    return [{"id": _id(obj, "sharegpt", msgs), "messages": msgs, "metadata": _meta(obj, source)}]


def alpaca(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or "instruction" not in obj or "output" not in obj:
        raise ImportFormatError("expected an object with 'instruction' and 'output'")
    user = str(obj["instruction"]).strip()
    if str(obj.get("input") or "").strip():
        user = f"{user}\n\n{str(obj['input']).strip()}"
    msgs = []
    if str(obj.get("system") or "").strip():
        msgs.append({"role": "system", "content": str(obj["system"]).strip()})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    return [{"id": _id(obj, "alpaca", msgs), "messages": msgs, "metadata": _meta(obj, source)}]


def _as_messages(x: object, default_role: str, where: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": default_role, "content": x}]
    if isinstance(x, list) and all(isinstance(m, dict) for m in x):
        return [{"role": m.get("role"), "content": m.get("content")} for m in x]
    raise ImportFormatError(f"{where}: expected a string or a list of messages")


def dpo(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not {"prompt", "chosen", "rejected"} <= set(obj):
        raise ImportFormatError("expected an object with 'prompt', 'chosen' and 'rejected'")
    prompt = _as_messages(obj["prompt"], "user", "prompt")
    chosen = _as_messages(obj["chosen"], "assistant", "chosen")
    rejected = _as_messages(obj["rejected"], "assistant", "rejected")
    return [{"id": _id(obj, "dpo", [prompt, chosen, rejected]), "prompt": prompt, "chosen": chosen,
             "rejected": rejected, "metadata": _meta(obj, source)}]


FUNCS = {"jsonl": chat, "sharegpt": sharegpt, "alpaca": alpaca, "dpo": dpo}
