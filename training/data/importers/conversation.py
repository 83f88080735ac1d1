"""From the turns an export holds to duet's canonical records.

An importer turns each conversation into a list of ``Turn``: the speakers' text plus what exports
hold besides (tool calls and results, reasoning, attachments). ``to_records`` then applies the
user's choices and duet's rules, counting every change:

- tools (``--tools``): ``drop`` removes tool calls and results (the assistant's words stay),
  ``fold`` writes them into the assistant turn (``<tool_call>`` / ``<tool_response>`` blocks, the
  form Qwen's and Hermes' chat templates use), ``keep`` keeps a call in the assistant turn and each
  result as a ``tool`` message;
- reasoning goes inside ``<think>...</think>`` at the start of the assistant turn it precedes, never
  into a user turn;
- consecutive turns of one speaker are joined; a conversation starts with the user (a system prompt
  may come first) and ends with the assistant;
- one record per conversation, split only at the start of a user turn when longer than ``max_len``
  tokens (each part user-first and assistant-last, the system prompt repeated), with a stable id
  from the source: the conversation id, plus ``-part<k>`` when split.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.data.schema import THINK_CLOSE, THINK_OPEN, estimate_tokens
from training.data.importers.text import Changes

TOOLS_MODES = ("drop", "fold", "keep")
KINDS = ("system", "user", "assistant", "reasoning", "tool_call", "tool_result", "attachment", "image")


@dataclass
class Turn:
    kind: str       # one of KINDS
    text: str
    name: str = ""  # the tool's name, the attachment's file name
    role: str = ""  # for an attachment or image: the speaker it belongs to (user when not said)


def _block(tag: str, name: str, text: str) -> str:
    attr = f' name="{name}"' if name else ""
    return f"<{tag}{attr}>\n{text.strip()}\n</{tag}>"


def _think(text: str) -> str:
    inner = text.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()
    return f"{THINK_OPEN}\n{inner}\n{THINK_CLOSE}"


def _apply_tools(turns: list[Turn], tools: str, changes: Changes) -> list[dict]:
    """Turns -> messages (role, content), tools/attachments/images as ``tools`` says."""
    out: list[dict] = []
    pending_reasoning: list[str] = []

    def opened(body: str) -> str:
        """The assistant's text with the reasoning that preceded it in front, inside <think>."""
        if not pending_reasoning:
            return body
        changes.add("reasoning put inside <think> of the answer", len(pending_reasoning))
        body = _think("\n\n".join(pending_reasoning)) + "\n\n" + body
        pending_reasoning.clear()
        return body

    for t in turns:
        text = t.text.strip()
        if not text and t.kind != "image":
            continue
        if t.kind == "reasoning":
            pending_reasoning.append(text)
            continue
        if t.kind in ("tool_call", "tool_result"):
            what = "tool calls" if t.kind == "tool_call" else "tool results"
            if tools == "drop":
                changes.add(f"{what} dropped")
                continue
            if t.kind == "tool_call" or tools == "fold":
                tag = "tool_call" if t.kind == "tool_call" else "tool_response"
                out.append({"role": "assistant", "content": opened(_block(tag, t.name, text)), "_tool": True})
                changes.add(f"{what} folded into the assistant turn")
            else:
                out.append({"role": "tool", "content": text, **({"name": t.name} if t.name else {})})
                changes.add("tool results kept as tool messages")
            continue
        if t.kind in ("attachment", "image"):
            what = "attachments" if t.kind == "attachment" else "images"
            if tools == "drop":
                changes.add(f"{what} dropped")
                continue
            body = _block("attachment", t.name, text) if t.kind == "attachment" else f"[image{': ' + t.name if t.name else ''}]"
            changes.add(f"{what} folded into the turn" if t.kind == "attachment" else "images replaced by a placeholder")
            out.append({"role": t.role if t.role in ("user", "assistant") else "user", "content": body})
            continue
        role = t.kind
        if text.count(THINK_OPEN) != text.count(THINK_CLOSE):  # a literal, unpaired tag in the source text
            text = text.replace(THINK_OPEN, "&lt;think&gt;").replace(THINK_CLOSE, "&lt;/think&gt;")
            changes.add("unpaired <think> tags in the text escaped")
        if role == "assistant":
            text = opened(text)
        elif pending_reasoning:
            changes.add("reasoning without an answer dropped", len(pending_reasoning))
            pending_reasoning.clear()
        out.append({"role": role, "content": text})
    if pending_reasoning:
        changes.add("reasoning without an answer dropped", len(pending_reasoning))
    return out


def _merge(msgs: list[dict], changes: Changes) -> list[dict]:
    out: list[dict] = []
    for m in msgs:
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            prev = out[-1]
            if not (prev.pop("_tool", False) or m.get("_tool")):
                changes.add("consecutive turns of one speaker joined")
            prev["content"] = f"{prev['content']}\n\n{m['content']}"
        else:
            out.append({k: v for k, v in m.items()})
    for m in out:
        m.pop("_tool", None)
    return out


def _shape(msgs: list[dict], changes: Changes) -> list[dict]:
    """User-first (after an optional system prompt), assistant-last, system only first, a tool
    message only between assistant turns."""
    system = []
    if msgs and msgs[0]["role"] == "system":
        system = [msgs[0]]
    rest = []
    for m in msgs[len(system):]:
        if m["role"] == "system":
            changes.add("system messages after the start dropped")
            continue
        rest.append(m)
    lead = 0
    while lead < len(rest) and rest[lead]["role"] != "user":
        lead += 1
    if lead:
        changes.add("turns before the first user turn dropped", lead)
    rest = rest[lead:]
    end = len(rest)
    while end and rest[end - 1]["role"] != "assistant":
        end -= 1
    if end < len(rest):
        changes.add("unanswered turns at the end dropped", len(rest) - end)
    rest = rest[:end]
    shaped = []
    for i, m in enumerate(rest):
        if m["role"] == "tool" and not (shaped and shaped[-1]["role"] in ("assistant", "tool")
                                        and i + 1 < len(rest) and rest[i + 1]["role"] in ("assistant", "tool")):
            changes.add("tool results outside an assistant turn dropped")
            continue
        shaped.append(m)
    shaped = _merge(shaped, changes) if any(a["role"] == b["role"] != "tool" for a, b in zip(shaped, shaped[1:])) else shaped
    return system + shaped if shaped else []


def _tokens(msgs: list[dict], count_tokens) -> int:
    if count_tokens is not None:
        return count_tokens({"messages": msgs})
    return sum(estimate_tokens(m["content"]) + 4 for m in msgs)


def _split(msgs: list[dict], max_len: int | None, count_tokens) -> list[list[dict]]:
    system = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    body = msgs[len(system):]
    exchanges: list[list[dict]] = []
    for m in body:
        if m["role"] == "user" or not exchanges:
            exchanges.append([m])
        else:
            exchanges[-1].append(m)
    if max_len is None or _tokens(msgs, count_tokens) <= max_len:
        return [msgs]
    parts: list[list[dict]] = []
    cur: list[dict] = []
    for ex in exchanges:
        if cur and _tokens(system + cur + ex, count_tokens) > max_len:
            parts.append(system + cur)
            cur = []
        cur = cur + ex
    if cur:
        parts.append(system + cur)
    return parts


def to_records(turns: list[Turn], *, base_id: str, meta: dict, tools: str, changes: Changes,
               max_len: int | None = None, count_tokens=None) -> tuple[list[dict], str | None]:
    """(records, None), or ([], reason) when the conversation holds no user turn answered by the
    assistant."""
    msgs = _shape(_merge(_apply_tools(turns, tools, changes), changes), changes)
    roles = {m["role"] for m in msgs}
    if "user" not in roles or "assistant" not in roles:
        return [], "no user turn answered by the assistant"
    parts = _split(msgs, max_len, count_tokens)
    if len(parts) > 1:
        changes.add("conversations split at turn boundaries (longer than --max-len)")
        changes.add("parts written for split conversations", len(parts))
    big = sum(1 for p in parts if max_len is not None and _tokens(p, count_tokens) > max_len)
    changes.add("records still longer than --max-len (one exchange is longer)", big)
    records = []
    for k, part in enumerate(parts, start=1):
        rid = base_id if len(parts) == 1 else f"{base_id}-part{k}"
        m = dict(meta)
        if len(parts) > 1:
            m.update(part=k, parts=len(parts))
        records.append({"id": rid, "messages": part, "metadata": m})
    return records, None
