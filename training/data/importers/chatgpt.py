"""ChatGPT's data export: ``conversations.json``, a list of conversations with a ``mapping`` tree.

Each conversation is followed from ``current_node`` up to the root: the branch the user kept
(messages on other branches are counted, not imported). Content types: ``text`` and
``multimodal_text`` (strings, image asset pointers, audio transcriptions), ``code`` (a tool call
when its recipient is a tool), ``execution_output`` / ``tether_browsing_display`` /
``tether_quote`` (tool results), ``thoughts`` (reasoning: into ``<think>`` of the answer),
``reasoning_recap`` ("Thought for 12s", dropped), hidden system and context messages (skipped).
"""

from __future__ import annotations

from datetime import datetime, timezone

from training.data.importers.conversation import Turn
from training.data.importers.source import ImportFormatError
from training.data.importers.text import Changes, clean_turn

HIDDEN_TYPES = ("user_editable_context", "model_editable_context")
HIDDEN = "hidden system and context messages skipped"


def _s(x: object) -> str:
    return x if isinstance(x, str) else ""


def _parts(content: dict, kind: str, changes: Changes, *, clean: bool, repair: bool) -> list[Turn]:
    """The turns of a text/multimodal_text content: strings (and transcriptions) as ``kind``, image
    pointers as images."""
    turns: list[Turn] = []
    parts = content.get("parts")
    if not isinstance(parts, list):
        parts = [content["text"]] if isinstance(content.get("text"), str) else []
    for p in parts:
        if isinstance(p, str):
            text = p
        elif isinstance(p, dict):
            ptype = _s(p.get("content_type"))
            if "image" in ptype:
                w, h = p.get("width"), p.get("height")
                size = f"{w}x{h}" if isinstance(w, int) and isinstance(h, int) else ""
                turns.append(Turn("image", "", size, role="assistant" if kind != "user" else "user"))
                continue
            text = _s(p.get("text"))
            if not text:
                if ptype:
                    changes.add(f"{ptype} parts dropped (no text)")
                continue
        else:
            continue
        text = clean_turn(text, changes, repair=repair) if clean else text.strip()
        if text:
            if turns and turns[-1].kind == kind:
                turns[-1].text += "\n" + text
            else:
                turns.append(Turn(kind, text))
    return turns


def _tool_text(content: dict) -> str:
    ct = _s(content.get("content_type"))
    if ct == "tether_browsing_display":
        return _s(content.get("result")) or _s(content.get("summary"))
    if ct == "tether_quote":
        return "\n".join(x for x in (_s(content.get("title")), _s(content.get("url")), _s(content.get("text"))) if x)
    if isinstance(content.get("text"), str):
        return content["text"]
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def _message_turns(m: dict, changes: Changes, repair: bool) -> list[Turn]:
    content = m.get("content")
    if not isinstance(content, dict):
        return []
    author = m.get("author") if isinstance(m.get("author"), dict) else {}
    role, name = _s(author.get("role")), _s(author.get("name"))
    ct = _s(content.get("content_type"))
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    recipient = _s(m.get("recipient")) or "all"
    if meta.get("is_visually_hidden_from_conversation") or meta.get("is_user_system_message") or ct in HIDDEN_TYPES:
        if _tool_text(content).strip() or ct in HIDDEN_TYPES:
            changes.add(HIDDEN)
        return []
    if role == "assistant" and ct == "thoughts":
        thoughts = content.get("thoughts") if isinstance(content.get("thoughts"), list) else []
        text = "\n\n".join(_s(t.get("content")) or _s(t.get("summary")) for t in thoughts if isinstance(t, dict))
        return [Turn("reasoning", clean_turn(text, changes, repair=repair))] if text.strip() else []
    if role == "assistant" and ct == "reasoning_recap":
        changes.add("reasoning recaps dropped ('Thought for ...')")
        return []
    if role == "assistant" and recipient != "all":
        return [Turn("tool_call", _tool_text(content), recipient)]
    if role == "tool":
        text = _tool_text(content)
        if ct == "multimodal_text":
            return [t if t.kind == "image" else Turn("tool_result", t.text, name)
                    for t in _parts(content, "tool_result", changes, clean=False, repair=False)]
        return [Turn("tool_result", text, name)] if text.strip() else []
    if role not in ("user", "assistant", "system"):
        if _tool_text(content).strip():
            changes.add(f"messages from {role or 'an unknown author'} skipped")
        return []
    if ct == "code":
        lang = _s(content.get("language"))
        lang = "" if lang == "unknown" else lang
        text = _s(content.get("text"))
        return [Turn(role, f"```{lang}\n{text.strip()}\n```")] if text.strip() else []
    if ct == "system_error":
        changes.add("system error messages dropped")
        return []
    turns = _parts(content, role, changes, clean=True, repair=repair)
    if role == "user":
        attachments = meta.get("attachments")
        if isinstance(attachments, list) and attachments:
            changes.add("attachments referenced (their content is not in the export)", len(attachments))
    if not turns and ct not in ("text", "multimodal_text", "") and _tool_text(content).strip():
        changes.add(f"{ct} messages skipped")
    return turns


def _visible(node: object) -> bool:
    m = node.get("message") if isinstance(node, dict) else None
    if not isinstance(m, dict) or not isinstance(m.get("content"), dict):
        return False
    author = m.get("author") if isinstance(m.get("author"), dict) else {}
    meta = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    return (author.get("role") in ("user", "assistant") and not meta.get("is_visually_hidden_from_conversation")
            and bool(_tool_text(m["content"]).strip()))


def _chain(obj: dict, changes: Changes) -> list[dict]:
    mapping = obj["mapping"]
    node_id = obj.get("current_node")
    if not isinstance(node_id, str) or node_id not in mapping:
        leaves = [k for k, v in mapping.items() if isinstance(v, dict) and not v.get("children")]
        if not leaves:
            raise ImportFormatError(f"current_node {node_id!r} is not in the mapping and no leaf to follow")

        def when(k: str) -> float:
            m = mapping[k].get("message")
            t = m.get("create_time") if isinstance(m, dict) else None
            return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0
        node_id = max(leaves, key=when)
        changes.add("conversations without a current_node: the latest branch taken")
    chain, seen = [], set()
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
    off = sum(1 for k, v in mapping.items() if k not in seen and _visible(v))
    changes.add("messages on branches not taken", off)
    return chain[::-1]


def _created(t: object) -> str | None:
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1e11:
        return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")
    return None


def conversation(obj: object, changes: Changes, *, repair: bool = True) -> tuple[str | None, dict, list[Turn]]:
    """(conversation id or None, metadata, turns) of one conversation; ImportFormatError to skip it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("mapping"), dict):
        raise ImportFormatError("expected a conversation with a 'mapping' tree")
    turns: list[Turn] = []
    for node in _chain(obj, changes):
        m = node.get("message")
        if isinstance(m, dict):
            turns.extend(_message_turns(m, changes, repair))
    cid = obj.get("conversation_id") or obj.get("id")
    meta: dict = {}
    if isinstance(obj.get("title"), str) and obj["title"].strip():
        meta["title"] = obj["title"].strip()
    if _created(obj.get("create_time")):
        meta["created"] = _created(obj.get("create_time"))
    if isinstance(obj.get("default_model_slug"), str):
        meta["model"] = obj["default_model_slug"]
    return (str(cid) if isinstance(cid, (str, int)) and not isinstance(cid, bool) and str(cid).strip() else None,
            meta, turns)
