"""Importers: chat data in other shapes -> duet's canonical chat JSONL (or canonical DPO JSONL).

Formats (``--format``):

- ``jsonl``: chat JSONL (``messages`` with system/user/assistant), the seed's format included;
- ``sharegpt``: ``{"conversations": [{"from": "human|gpt|system", "value": ...}]}``, a JSON list or JSONL;
- ``alpaca``: ``{"instruction", "input", "output"}``, a JSON list or JSONL;
- ``chatgpt``: the ChatGPT data export's ``conversations.json``; each conversation's ``mapping``
  tree is followed from ``current_node`` up to the root, so only the branch the user kept counts;
- ``markdown``: transcripts where headings, bold labels, block quotes or callouts name the speaker
  (``## User`` / ``## Assistant``, ``**User:**``, ``> **Assistant**``, ``>[!user]``); one
  conversation per file, or per top-level ``# `` heading when there are several;
- ``dpo``: ``{"prompt", "chosen", "rejected"}`` as strings or message lists;
- ``auto``: detected from the file (and reported).

Canonical chat record: ``{"id", "messages": [{"role", "content"}], "metadata": {"source", ...}}``.
Canonical DPO record: ``{"id", "prompt": [messages], "chosen": [assistant message],
"rejected": [assistant message], "metadata": {...}}`` (TRL's conversational preference format).
Ids that the source lacks are derived from the content (stable across re-imports).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.dataset import DatasetError, input_file, max_turn_chars, parse_json

FORMATS = ("auto", "jsonl", "sharegpt", "alpaca", "chatgpt", "markdown", "dpo")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
DEFAULT_USER_LABELS = ("user", "human", "me", "you", "question", "q")
DEFAULT_ASSISTANT_LABELS = ("assistant", "ai", "gpt", "chatgpt", "claude", "bot", "model", "answer", "a")


class ImportFormatError(ValueError):
    """Input that cannot be imported; the message names the file (and line or record)."""


@dataclass
class ImportResult:
    format: str
    detected: bool
    records: list[dict]
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason"}


def _stable_id(prefix: str, obj: object) -> str:
    return f"{prefix}-{hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]}"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:1 << 20] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ImportFormatError(f"{path}: binary data (NUL bytes), not a text export")
    for bom, enc in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as exc:
                raise ImportFormatError(f"{path}: not valid UTF-16 (byte {exc.start})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ImportFormatError(f"{path}:{line}: not UTF-8 (byte {exc.start}); convert the file to UTF-8 first") from exc


def _parse(text: str, where: str) -> object:
    try:
        return parse_json(text, where)
    except ValueError as exc:
        raise ImportFormatError(str(exc)) from exc


def _load_json_or_jsonl(path: Path) -> list[tuple[str, object]]:
    """[(where, object)]: a JSON document (a list: one item each) or JSONL lines."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        doc = _parse(text, str(path))
        if not isinstance(doc, list):
            raise ImportFormatError(f"{path}: expected a JSON list")
        return [(f"{path}[{i}]", x) for i, x in enumerate(doc)]
    if stripped.startswith("{") and "\n{" not in stripped:
        try:
            return [(str(path), parse_json(text, str(path)))]
        except ValueError:
            pass
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        out.append((f"{path}:{n}", _parse(line, f"{path}:{n}")))
    return out


def detect(path: Path) -> str:
    if path.suffix.lower() in (".md", ".markdown", ".txt"):
        return "markdown"
    items = _load_json_or_jsonl(path)
    if not items:
        raise ImportFormatError(f"{path}: empty")
    first = items[0][1]
    if isinstance(first, dict):
        keys = set(first)
        if "mapping" in keys and "current_node" in keys:
            return "chatgpt"
        if {"chosen", "rejected"} <= keys:
            return "dpo"
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys and "output" in keys:
            return "alpaca"
        if "messages" in keys:
            return "jsonl"
    raise ImportFormatError(f"{items[0][0]}: cannot tell the format (keys {sorted(first) if isinstance(first, dict) else type(first).__name__}); "
                       f"pass --format {'|'.join(FORMATS[1:])}")


def import_file(src: str | os.PathLike, fmt: str = "auto", *, user_labels: tuple[str, ...] = DEFAULT_USER_LABELS,
                assistant_labels: tuple[str, ...] = DEFAULT_ASSISTANT_LABELS) -> ImportResult:
    """Import ``src``; ImportFormatError (nothing written) for a file that is not the format it
    claims, or that yields no record at all. Items that cannot be read are skipped with a reason."""
    try:
        path = input_file(src)
    except DatasetError as exc:
        raise ImportFormatError(str(exc)) from exc
    if fmt not in FORMATS:
        raise ImportFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    detected = fmt == "auto"
    if detected:
        fmt = detect(path)
    if fmt == "markdown":
        recs, skipped = _markdown(path, user_labels, assistant_labels)
    else:
        fn = {"jsonl": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "chatgpt": _chatgpt, "dpo": _dpo}[fmt]
        recs, skipped = [], []
        for where, obj in _load_json_or_jsonl(path):
            try:
                recs.extend(fn(obj, path.name))
            except ImportFormatError as exc:
                skipped.append({"where": where, "reason": str(exc)})
    storable = []
    limit = max_turn_chars()
    for r in recs:
        try:
            json.dumps(r, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (UnicodeEncodeError, ValueError):
            skipped.append({"where": str(r.get("id")), "reason": "not valid Unicode (a lone surrogate escape)"})
            continue
        turns = [m for k in ("messages", "prompt", "chosen", "rejected") for m in (r.get(k) or [])
                 if isinstance(m, dict) and isinstance(m.get("content"), str)]
        big = max((len(m["content"]) for m in turns), default=0)
        if big > limit:
            skipped.append({"where": str(r.get("id")), "reason": f"a turn of {big:,} characters, above the limit of "
                                                                 f"{limit:,} (DUET_MAX_TURN_CHARS raises it)"})
            continue
        storable.append(r)
    if not storable:
        first = f": {skipped[0]['where']}: {skipped[0]['reason']}" if skipped else ""
        raise ImportFormatError(f"{path}: no record could be imported as {fmt} ({len(skipped)} skipped{first})")
    return ImportResult(fmt, detected, storable, skipped)


def _meta(obj: dict, source: str) -> dict:
    meta = dict(obj.get("metadata") or {}) if isinstance(obj.get("metadata"), dict) else {}
    meta.setdefault("source", source)
    return meta


def _chat(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ImportFormatError("expected an object with a 'messages' list")
    msgs = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in obj["messages"]]
    rid = obj.get("id") if isinstance(obj.get("id"), str) else _stable_id("chat", msgs)
    return [{"id": rid, "messages": msgs, "metadata": _meta(obj, source)}]


def _sharegpt(obj: object, source: str) -> list[dict]:
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
        msgs.append({"role": SHAREGPT_ROLES[who], "content": turn.get("value")})
    rid = str(obj["id"]) if obj.get("id") is not None else _stable_id("sharegpt", msgs)
    return [{"id": rid, "messages": msgs, "metadata": _meta(obj, source)}]


def _alpaca(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or "instruction" not in obj or "output" not in obj:
        raise ImportFormatError("expected an object with 'instruction' and 'output'")
    user = str(obj["instruction"]).strip()
    if str(obj.get("input") or "").strip():
        user = f"{user}\n\n{str(obj['input']).strip()}"
    msgs = []
    if str(obj.get("system") or "").strip():
        msgs.append({"role": "system", "content": str(obj["system"]).strip()})
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    rid = str(obj["id"]) if obj.get("id") is not None else _stable_id("alpaca", msgs)
    return [{"id": rid, "messages": msgs, "metadata": _meta(obj, source)}]


def _chatgpt_text(message: dict) -> str:
    content = message.get("content")
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(p for p in parts if isinstance(p, str)).strip()
    if isinstance(content.get("text"), str):
        return content["text"].strip()
    return ""


def _chatgpt(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("mapping"), dict):
        raise ImportFormatError("expected a conversation with a 'mapping' tree")
    mapping = obj["mapping"]
    node_id = obj.get("current_node")
    if not isinstance(node_id, str) or node_id not in mapping:
        raise ImportFormatError(f"current_node {node_id!r} is not in the mapping")
    chain = []
    seen = set()
    while node_id is not None:
        if not isinstance(node_id, str):
            raise ImportFormatError(f"a parent id {node_id!r} is not a string")
        if node_id in seen:
            raise ImportFormatError(f"the mapping has a cycle at {node_id!r}")
        seen.add(node_id)
        node = mapping.get(node_id)
        if not isinstance(node, dict):
            raise ImportFormatError(f"node {node_id!r} is referenced but missing from the mapping (or not an object)")
        chain.append(node)
        node_id = node.get("parent")
    msgs = []
    for node in reversed(chain):
        m = node.get("message")
        if not isinstance(m, dict):
            continue
        author = m.get("author")
        role = author.get("role") if isinstance(author, dict) else None
        if role not in ("system", "user", "assistant"):
            continue  # tool calls, browsing results
        meta = m.get("metadata")
        if isinstance(meta, dict) and meta.get("is_visually_hidden_from_conversation"):
            continue
        text = _chatgpt_text(m)
        if not text:
            continue
        if msgs and msgs[-1]["role"] == role:  # a split answer: join the parts
            msgs[-1]["content"] += "\n\n" + text
        else:
            msgs.append({"role": role, "content": text})
    if not msgs:
        raise ImportFormatError("no user or assistant text on the current branch")
    cid = obj.get("conversation_id") or obj.get("id")
    rid = str(cid) if isinstance(cid, (str, int)) and not isinstance(cid, bool) else _stable_id("chatgpt", msgs)
    meta = {"source": source}
    if isinstance(obj.get("title"), str) and obj["title"]:
        meta["title"] = obj["title"]
    return [{"id": rid, "messages": msgs, "metadata": meta}]


def _as_messages(x: object, default_role: str, where: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": default_role, "content": x}]
    if isinstance(x, list) and all(isinstance(m, dict) for m in x):
        return [{"role": m.get("role"), "content": m.get("content")} for m in x]
    raise ImportFormatError(f"{where}: expected a string or a list of messages")


def _dpo(obj: object, source: str) -> list[dict]:
    if not isinstance(obj, dict) or not {"prompt", "chosen", "rejected"} <= set(obj):
        raise ImportFormatError("expected an object with 'prompt', 'chosen' and 'rejected'")
    prompt = _as_messages(obj["prompt"], "user", "prompt")
    chosen = _as_messages(obj["chosen"], "assistant", "chosen")
    rejected = _as_messages(obj["rejected"], "assistant", "rejected")
    rid = str(obj["id"]) if obj.get("id") is not None else _stable_id("dpo", [prompt, chosen, rejected])
    return [{"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "metadata": _meta(obj, source)}]


def _label_regex(labels: tuple[str, ...]) -> str:
    return "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))


def _markdown(path: Path, user_labels, assistant_labels) -> tuple[list[dict], list[dict]]:
    text = _read_text(path)
    labels = _label_regex(tuple(user_labels) + tuple(assistant_labels) + ("system",))
    speaker = re.compile(
        rf"^\s*(?:"
        rf"#{{2,6}}\s*(?P<h>{labels})\s*:?\s*$"                              # ## User
        rf"|>?\s*\*\*(?P<b>{labels})\s*:?\s*\*\*\s*:?\s*(?P<brest>.*)$"     # **User:** text / > **User**
        rf"|>\s*\[!(?P<c>{labels})\][-+]?\s*(?P<crest>.*)$"                 # >[!user] callout
        rf")", re.I)
    user_set = {x.lower() for x in user_labels}
    asst_set = {x.lower() for x in assistant_labels}
    convs: list[tuple[str, list[tuple[str, list[str], int]]]] = [("", [])]
    in_code = False
    quoted_turn = False
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("```"):
            in_code = not in_code
        if not in_code:
            if re.match(r"^#\s+\S", line):
                if convs[-1][1]:
                    convs.append((line[2:].strip(), []))
                else:
                    convs[-1] = (line[2:].strip(), [])
                continue
            m = speaker.match(line)
            if m:
                label = (m.group("h") or m.group("b") or m.group("c")).lower()
                role = "user" if label in user_set else "assistant" if label in asst_set else "system"
                rest = (m.group("brest") or m.group("crest") or "").strip()
                quoted_turn = line.lstrip().startswith(">")
                convs[-1][1].append((role, [rest] if rest else [], n))
                continue
        if convs[-1][1]:
            body = line
            if quoted_turn and body.lstrip().startswith(">"):
                body = re.sub(r"^\s*>\s?", "", body)
            convs[-1][1][-1][1].append(body)
    records, skipped = [], []
    for title, turns in convs:
        if not turns:
            continue
        msgs = [{"role": role, "content": "\n".join(lines).strip()} for role, lines, _ in turns]
        msgs = [m for m in msgs if m["content"]]
        if not msgs:
            skipped.append({"where": f"{path}:{turns[0][2]}", "reason": "turns without text"})
            continue
        meta = {"source": path.name}
        if title:
            meta["title"] = title
        records.append({"id": _stable_id("md", msgs), "messages": msgs, "metadata": meta})
    if not records:
        raise ImportFormatError(f"{path}: no speaker labels found (looked for {', '.join(user_labels)} / "
                           f"{', '.join(assistant_labels)} as '## Label', '**Label:**' or '>[!label]')")
    return records, skipped


def check_output(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The output path of an import: ImportFormatError when it is the input itself (or a link to it)
    or not a file path."""
    out_p, src_p = Path(out), Path(src)
    if out_p.exists() and not out_p.is_file():
        raise ImportFormatError(f"-o {out}: not a file path (a folder or device); give the JSONL file to write")
    same = out_p.resolve() == src_p.resolve()
    if not same and out_p.exists() and src_p.exists():
        same = os.path.samefile(out_p, src_p)
    if same:
        raise ImportFormatError(f"-o {out} is the input file itself; write the import to another file")
    return out_p


def write_jsonl(records: list[dict], out: str | os.PathLike) -> None:
    """Write atomically (temp file + rename): a failed import leaves no half-written output."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records),
                       encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
