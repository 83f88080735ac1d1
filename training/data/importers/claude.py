"""Claude's data export: ``conversations.json``, a list of ``{uuid, name, chat_messages: [...]}``.

A message has ``sender`` (human / assistant), ``text`` and ``content`` parts: ``text``,
``thinking`` (into ``<think>`` of the answer), ``tool_use`` and ``tool_result`` (``--tools``),
images and documents; ``attachments`` (pasted or uploaded text, ``extracted_content``) and
``files`` (their content is not in the export). When messages carry ``parent_message_uuid`` and a
message has more than one child (an edited prompt, a retried answer), the branch that ends with
the last message is imported and the others are counted.
"""

from __future__ import annotations

import json

from training.data.importers.conversation import Turn
from training.data.importers.source import ImportFormatError
from training.data.importers.text import Changes, clean_turn, remove_unsupported_blocks

ROLES = {"human": "user", "user": "user", "assistant": "assistant"}
ROOT = "00000000-0000-4000-8000-000000000000"
MAX_ATTACHMENTS = 1000   # per message; more are counted and skipped


def _s(x: object) -> str:
    return x if isinstance(x, str) else ""


def _result_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_s(c.get("text")) for c in content if isinstance(c, dict) and _s(c.get("text")))
    return ""


def _branch(msgs: list[dict], changes: Changes) -> list[dict]:
    ids = {m.get("uuid") for m in msgs}
    if not msgs or not all(isinstance(m.get("parent_message_uuid"), str) and isinstance(m.get("uuid"), str)
                           for m in msgs):
        return msgs
    children: dict[str, int] = {}
    for m in msgs:
        children[m["parent_message_uuid"]] = children.get(m["parent_message_uuid"], 0) + 1
    if all(n == 1 for n in children.values()):
        return msgs
    by_id = {m["uuid"]: m for m in msgs}
    chain, node, seen = [], msgs[-1], set()
    while node is not None and node["uuid"] not in seen:
        seen.add(node["uuid"])
        chain.append(node)
        parent = node["parent_message_uuid"]
        node = by_id.get(parent) if parent in ids and parent != ROOT else None
    changes.add("messages on branches not taken", len(msgs) - len(chain))
    return chain[::-1]


_FENCED = {"application/vnd.ant.code": "", "text/html": "html", "image/svg+xml": "svg",
           "application/vnd.ant.mermaid": "mermaid", "application/vnd.ant.react": "jsx"}


def _artifact(part: dict) -> str:
    """A created (or rewritten) artifact is the assistant's own work: its text, fenced when it is
    code. '' for anything else (edits of an artifact, other tools)."""
    args = part.get("input")
    if _s(part.get("name")) != "artifacts" or not isinstance(args, dict) or not _s(args.get("content")).strip():
        return ""
    if _s(args.get("command")) not in ("create", "rewrite", ""):
        return ""
    kind = _s(args.get("type"))
    title = _s(args.get("title")).strip()
    body = args["content"].strip()
    if kind in _FENCED:
        lang = _s(args.get("language")) or _FENCED[kind]
        body = f"```{lang}\n{body}\n```"
    return f"**{title}**\n\n{body}" if title else body


def _message_turns(m: dict, role: str, changes: Changes, repair: bool) -> list[Turn]:
    turns: list[Turn] = []
    parts = m.get("content") if isinstance(m.get("content"), list) else []
    used_parts = False
    for p in parts:
        if not isinstance(p, dict):
            continue
        ptype = _s(p.get("type"))
        if ptype == "text":
            used_parts = True
            text = clean_turn(remove_unsupported_blocks(_s(p.get("text")), changes), changes, repair=repair)
            if text:
                turns.append(Turn(role, text))
        elif ptype == "thinking":
            used_parts = True
            text = _s(p.get("thinking"))
            if text.strip() and role == "assistant":
                turns.append(Turn("reasoning", clean_turn(text, changes, repair=repair)))
        elif ptype == "redacted_thinking":
            used_parts = True
            changes.add("redacted reasoning dropped (its text is not in the export)")
        elif ptype == "tool_use" and _artifact(p):
            used_parts = True
            turns.append(Turn("assistant", _artifact(p)))
            changes.add("artifacts kept as the assistant's text")
        elif ptype == "tool_use":
            used_parts = True
            args = p.get("input")
            text = json.dumps({"name": _s(p.get("name")), "arguments": args}, ensure_ascii=False) \
                if args is not None else _s(p.get("name"))
            turns.append(Turn("tool_call", text, _s(p.get("name"))))
        elif ptype == "tool_result":
            used_parts = True
            text = _result_text(p.get("content"))
            if text.strip():
                turns.append(Turn("tool_result", text, _s(p.get("name"))))
        elif ptype in ("image", "document"):
            used_parts = True
            turns.append(Turn("image", "", ptype if ptype != "image" else "", role=role))
        elif ptype:
            used_parts = True
            changes.add(f"{ptype} parts skipped")
    if not used_parts:
        text = clean_turn(remove_unsupported_blocks(_s(m.get("text")), changes), changes, repair=repair)
        if text:
            turns.append(Turn(role, text))
    own_text = any(t.kind == role for t in turns)
    attachments = m.get("attachments") or []
    if not isinstance(attachments, list):
        raise ImportFormatError(f"message {_s(m.get('uuid'))[:40] or '?'}: 'attachments' is a "
                                f"{type(attachments).__name__}, not a list")
    if len(attachments) > MAX_ATTACHMENTS:
        changes.add(f"attachments beyond {MAX_ATTACHMENTS} in one message skipped", len(attachments) - MAX_ATTACHMENTS)
        attachments = attachments[:MAX_ATTACHMENTS]
    for a in attachments:
        if isinstance(a, dict) and _s(a.get("extracted_content")).strip():
            if not own_text:  # pasted text and nothing else: it is what the user said
                turns.append(Turn(role, clean_turn(a["extracted_content"], changes, repair=repair)))
                changes.add("attachments kept as the turn's text (it had no other)")
                continue
            turns.append(Turn("attachment", a["extracted_content"], _s(a.get("file_name")), role=role))
    files = m.get("files") or []
    files = [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    if files:
        changes.add("files referenced (their content is not in the export)", len(files))
    return turns


def conversation(obj: object, changes: Changes, *, repair: bool = True) -> tuple[str | None, dict, list[Turn]]:
    """(conversation id or None, metadata, turns) of one Claude conversation; ImportFormatError to
    skip it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("chat_messages"), list):
        raise ImportFormatError("expected a conversation with a 'chat_messages' list")
    msgs = [m for m in obj["chat_messages"] if isinstance(m, dict)]
    if len(msgs) < len(obj["chat_messages"]):
        changes.add("messages that are not objects skipped", len(obj["chat_messages"]) - len(msgs))
    turns: list[Turn] = []
    for m in _branch(msgs, changes):
        role = ROLES.get(_s(m.get("sender")).lower())
        if role is None:
            changes.add(f"messages from sender {_s(m.get('sender')) or '(none)'!r} skipped")
            continue
        turns.extend(_message_turns(m, role, changes, repair))
    meta: dict = {}
    if _s(obj.get("name")).strip():
        meta["title"] = obj["name"].strip()
    if _s(obj.get("created_at")):
        meta["created"] = obj["created_at"]
    cid = obj.get("uuid")
    return (cid if isinstance(cid, str) and cid.strip() else None), meta, turns
