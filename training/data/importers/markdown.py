"""Markdown chat exports: the speaker labels are learned from the file.

A speaker line is a heading (``## User``, ``## 👤 **RAF**``, ``### **Assistant** - 18.06.2025``),
a bold label (``**User:** text``, ``> **Assistant**``) or an Obsidian callout
(``>[!nexus_user] **User** - 18.06.2025 at 21:26``, every line of the turn quoted with ``> ``).
Labels are read without their emoji, emphasis and trailing date. A label is a known speaker
(User, You, Human / Assistant, GPT, ChatGPT, Claude, ... / Tool, Python, Browser / System), a
callout type naming one (``nexus_user``, ``nexus_agent``), or a name learned from the file: in a
style (a heading level, bold lines, callouts) where known speakers appear, the one recurring
unknown label that shares their decoration and precedes the assistant is the user (the user is
often known only by a personal name); with no known label at all, two labels that strictly
alternate are the user (first) and the assistant. ``--user-label`` / ``--assistant-label``
override what is learned.

Everything else stays inside the turn it is in: sub-headings, tables, code blocks (never read
for speakers), block quotes. Between turns, ``---`` rules, ``<!-- UID: ... -->`` comments and
date-only lines are markup, not text. A file holds one conversation, or several when a top-level
``# `` heading right before a user turn follows an assistant turn (a concatenated export); a
YAML front matter block gives the title and the conversation id.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from training.data.importers.conversation import Turn
from training.data.importers.source import ImportFormatError
from training.data.importers.text import Changes, clean_turn, repair_mojibake

USER_LABELS = ("user", "human", "me", "you", "you said", "question", "q", "prompt", "ich", "yo", "moi", "io")
ASSISTANT_LABELS = ("assistant", "ai", "gpt", "chatgpt", "chatgpt said", "claude", "gemini", "copilot", "bard",
                    "bot", "model", "answer", "a", "response", "llm", "agent", "grok", "deepseek", "mistral", "llama",
                    "perplexity", "qwen")
TOOL_LABELS = ("tool", "tools", "tool output", "tool result", "function", "plugin", "browser", "python",
               "code interpreter", "search", "web", "web search", "file search")
SYSTEM_LABELS = ("system", "system prompt", "instructions")
_MODEL_NAME = re.compile(r"^(?:chat\s?)?gpt[-\s]?[\w.]*|^o\d(?:[-\s][\w.]+)?$|^(?:claude|gemini|llama|mistral|qwen|deepseek|"
                         r"grok|copilot)\b.*", re.I)
_CALLOUT_ROLES = (("user", "user"), ("human", "user"), ("agent", "assistant"), ("assistant", "assistant"),
                  ("bot", "assistant"), ("model", "assistant"), ("gpt", "assistant"), ("claude", "assistant"),
                  ("tool", "tool"), ("system", "system"))

# Decorations that say who speaks when the label does not (a custom GPT's name, a nickname).
_EMOJI_ROLES = {**{e: "user" for e in "👤👩👨🧑🙋🙂😀🗣"}, **{e: "assistant" for e in "🤖🧠✨💬🦾"},
                **{e: "tool" for e in "🌀🔧🛠⚙🔨🧰📎"}}

_FENCE = re.compile(r"^\s*(```|~~~)")
# Every pattern here runs in time linear in the line (tests/unit/test_importers.py times each against
# adversarial 10k-character lines): possessive quantifiers (*+) where two runs of spaces meet.
_HEADING = re.compile(r"^(#{1,6})\s++(.*)$")   # the closing #s are stripped in code (heading_text)
_BOLD = re.compile(r"^\s*+(>\s*+)?(?:\*\*|__)(?P<label>[^*_\n]{1,60}?)\s*+:?\s*+(?:\*\*|__)\s*+:?\s*+(?P<rest>.*)$")
_CALLOUT = re.compile(r"^\s*>\s*\[!(?P<type>[\w-]{1,40})\][-+]?\s*(?P<rest>.*)$")
_DATE_TAIL = re.compile(r"\s*(?:[-–—·|,@]|\bat\b|\bon\b|\()\s*[\w.,:/ -]*\d[\w.,:/ )-]*$")
_DATE_ONLY = re.compile(r"^[\s#*_>()\[\]]*(?:\d{1,4}[./:-]\d{1,2}(?:[./:-]\d{1,4})?|\d{1,2}\s+\w{3,9}\s+\d{2,4}|\w{3,9}\s+\d{1,2},?\s+\d{4})"
                        r"(?:[\s,T]*(?:at\s+)?\d{1,2}:\d{2}(?::\d{2})?(?:\s*[AP]M)?)?[\s*_()\[\]]*$", re.I)
_LEAD_DATE = re.compile(r"^(?:[-–—·|@,]\s*+)?\(?\s*+(?:(?:on\s++)?\d{1,4}[./-]\d{1,2}[./-]\d{1,4}(?:[\sT,]*+(?:at\s++)?\d{1,2}:\d{2}"
                        r"(?::\d{2})?(?:\.\d++)?(?:\s*+[AP]M)?)?|\d{1,2}:\d{2}(?::\d{2})?(?:\s*+[AP]M)?)\s*+\)?\s*+:?\s*+", re.I)
MAX_LABEL_SOURCE = 200   # a heading longer than this is no speaker label (and no date-tail regex runs on it)
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$")


def _emoji_role(raw: str) -> str | None:
    return next((_EMOJI_ROLES[c] for c in raw if c in _EMOJI_ROLES), None)


def _strip_decoration(raw: str) -> tuple[str, bool, bool]:
    """(label, had emoji, was bold) of a heading's or a bold line's text."""
    emoji = any(unicodedata.category(c) in ("So", "Sk", "Cs", "Co") for c in raw)
    bold = "**" in raw or "__" in raw
    s = "".join(c for c in raw if unicodedata.category(c) not in ("So", "Sk", "Cs", "Co", "Mn", "Cf") or c.isalnum())
    s = re.sub(r"[*_`~]", "", s).strip()
    s = re.sub(r"^title:\s*", "", s, flags=re.I)
    if len(s) <= MAX_LABEL_SOURCE:  # _DATE_TAIL backtracks on long text; a label is short
        s = _DATE_TAIL.sub("", s).strip().rstrip(":").strip()
    return s, emoji, bold


def heading_text(m: re.Match) -> str:
    """A heading's text without its closing #s (``## User ##`` -> ``User``)."""
    return m.group(2).rstrip().rstrip("#").rstrip()


def _label_ok(label: str) -> bool:
    return 0 < len(label) <= 40 and len(label.split()) <= 4 and not label.endswith((".", "?", "!")) \
        and not label.startswith(("[", "http"))


def _known_role(label: str) -> str | None:
    low = label.lower()
    for role, names in (("user", USER_LABELS), ("assistant", ASSISTANT_LABELS), ("tool", TOOL_LABELS),
                        ("system", SYSTEM_LABELS)):
        if low in names:
            return role
    return "assistant" if _MODEL_NAME.match(label) else None


@dataclass
class _Cand:
    line: int
    style: str          # "h2", "bold", "callout", ...
    label: str
    shape: tuple        # (emoji, bold): the decoration
    rest: str = ""      # text on the speaker line itself
    quoted: bool = False
    ctype: str = ""     # callout type
    role: str | None = None
    hint: str | None = None  # the role its emoji suggests
    hinted: bool = False


@dataclass
class Learned:
    labels: dict = field(default_factory=dict)  # "style label" -> "role (how)"


def _front_matter(lines: list[str]) -> tuple[dict, int]:
    if not lines or lines[0].strip() != "---":
        return {}, 0
    meta = {}
    for i in range(1, min(len(lines), 200)):
        if lines[i].strip() == "---":
            return meta, i + 1
        m = re.match(r"^([\w-]+):\s*(.*)$", lines[i])
        if m:
            meta[m.group(1).lower()] = m.group(2).strip().strip("'\"")
        elif lines[i].strip() and not lines[i].startswith((" ", "\t", "-")):
            return {}, 0
    return {}, 0


def _candidates(lines: list[str], start: int) -> list[_Cand]:
    out, fence = [], None
    for n in range(start, len(lines)):
        line = lines[n]
        bare = re.sub(r"^\s*>\s?", "", line) if line.lstrip().startswith(">") else line
        f = _FENCE.match(bare)
        if f:
            fence = None if fence == f.group(1) else (fence or f.group(1))
            continue
        if fence:
            continue
        m = _CALLOUT.match(line)
        if m:
            rest = m.group("rest")
            b = _BOLD.match(rest)
            label, emoji, bold = _strip_decoration(b.group("label") if b else rest)
            out.append(_Cand(n, "callout", label, (emoji, bold), _LEAD_DATE.sub("", b.group("rest").strip(), count=1)
                             if b else "", True, m.group("type").lower()))
            continue
        m = _HEADING.match(line)
        if m:
            raw = repair_mojibake(heading_text(m))
            label, emoji, bold = _strip_decoration(raw)
            if _label_ok(label):
                out.append(_Cand(n, f"h{len(m.group(1))}", label, (emoji, bold), hint=_emoji_role(raw)))
            continue
        m = _BOLD.match(line)
        if m:
            label, emoji, _ = _strip_decoration(repair_mojibake(m.group("label")))
            rest = _LEAD_DATE.sub("", m.group("rest").strip(), count=1)  # **RAF** (23/07/2025 10:32): text
            if _label_ok(label):
                out.append(_Cand(n, "bold", label, (emoji, True), rest, bool(m.group(1))))
    return out


def _learn(cands: list[_Cand], overrides: dict[str, str], learned: Learned) -> list[_Cand]:
    """The candidates that are speaker lines, each with its role."""
    for c in cands:
        low = c.label.lower()
        if low in overrides:
            c.role = overrides[low]
        elif c.style == "callout":
            base = re.sub(r"^(?:nexus|chat|ai)[_-]", "", c.ctype)
            c.role = next((r for k, r in _CALLOUT_ROLES if k in base), None) or _known_role(c.label)
            if c.role is None and c.ctype.startswith("nexus_"):
                c.role = "attachment"  # >[!nexus_attachment] and the like: a block of its own, not a turn's text
        else:
            c.role = _known_role(c.label)
    speakers: list[_Cand] = []
    for style in sorted({c.style for c in cands}):
        group = [c for c in cands if c.style == style]
        have = {c.role for c in group if c.role}
        for role in {c.hint for c in group if c.hint} - have:  # an emoji says who speaks where no label does
            hinted = Counter(c.label for c in group if c.role is None and c.hint == role and c.label.lower() not in overrides)
            bold = {c.label for c in group if c.shape[1]}
            best = max(hinted, key=lambda k: (hinted[k], k in bold), default=None)  # one label a role
            for c in group:
                if c.role is None and c.label == best:
                    c.role, c.hinted = role, True
        known = [c for c in group if c.role]
        roles = {c.role for c in known}
        if style == "h1" and not overrides:
            continue  # top-level headings are titles unless the user says otherwise
        if known and roles & {"user", "assistant"}:
            missing = [r for r in ("user", "assistant") if r not in roles]
            unknown = [c for c in group if not c.role]
            if len(missing) == 1 and unknown:
                other = "assistant" if missing[0] == "user" else "user"
                shapes = Counter(c.shape for c in known)
                score: Counter = Counter()
                for i, c in enumerate(group):
                    if c.role is None:
                        nxt = group[i + 1] if i + 1 < len(group) else None
                        score[c.label] += 1 + 2 * (c.shape in shapes) + 3 * (nxt is not None and nxt.role == other)
                label = max(score, key=lambda k: (score[k], -next(i for i, c in enumerate(group) if c.label == k)))
                for c in unknown:
                    if c.label == label:
                        c.role = missing[0]
                learned.labels[f"{style} {label}"] = f"{missing[0]} (learned)"
            speakers += [c for c in group if c.role]
        elif not speakers and style.startswith("h") and not any(c.role in ("user", "assistant") for c in cands):
            labels = [c.label for c in group if not c.role]
            distinct = list(dict.fromkeys(labels))
            if len(distinct) == 2 and len(labels) >= 2 and all(a != b for a, b in zip(labels, labels[1:])):
                for c in group:
                    if not c.role:
                        c.role = "user" if c.label == distinct[0] else "assistant"
                learned.labels[f"{style} {distinct[0]}"] = "user (learned: the first of two alternating speakers)"
                learned.labels[f"{style} {distinct[1]}"] = "assistant (learned: the second of two alternating speakers)"
                speakers += group
    for c in speakers:
        how = " (given)" if c.label.lower() in overrides else " (learned from its emoji)" if c.hinted else ""
        learned.labels.setdefault(f"{c.style} {c.label}", c.role + how)
    return sorted(speakers, key=lambda c: c.line)


def _is_comment(s: str) -> bool:
    return len(s) >= 7 and s.startswith("<!--") and s.endswith("-->")


def strip_comments(text: str) -> tuple[str, int]:
    """``text`` without its closed HTML comments, and how many (what ``<!--.*?-->`` removes, in one
    pass: the regex rescans the rest of the text from every unclosed ``<!--``)."""
    out, n, i = [], 0, 0
    while True:
        a = text.find("<!--", i)
        b = text.find("-->", a + 4) if a >= 0 else -1
        if a < 0 or b < 0:
            out.append(text[i:])
            return "".join(out), n
        out.append(text[i:a])
        i, n = b + 3, n + 1


def _tidy(lines: list[str], changes: Changes) -> str:
    """A turn's lines without markup at its ends (rules, comments, date-only lines)."""
    text = "\n".join(lines)
    if "<!--" in text:
        text, n = strip_comments(text)
        changes.add("HTML comments removed (<!-- ... -->)", n)
    kept = text.split("\n")

    def markup(s: str) -> bool:
        return not s.strip() or bool(_RULE.match(s)) or bool(_DATE_ONLY.match(s))
    while kept and markup(kept[-1]):
        kept.pop()
    while kept and markup(kept[0]):
        kept.pop(0)
    return "\n".join(kept)


def conversations(text: str, name: str, changes: Changes, *, overrides: dict[str, str],
                  repair: bool = True, where: str = "") -> tuple[list[tuple[str, dict, list[Turn]]], Learned]:
    """[(conversation id, metadata, turns)] of a Markdown export, and what was learned about its
    labels; ImportFormatError when no speaker line is found."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    front, start = _front_matter(lines)
    learned = Learned()
    speakers = _learn(_candidates(lines, start), overrides, learned)
    if not any(c.role == "user" for c in speakers) or not any(c.role == "assistant" for c in speakers):
        seen = Counter(c.label for c in _candidates(lines, start) if c.style != "h1")
        common = ", ".join(f"{k!r}" for k, _ in seen.most_common(6)) or "none"
        raise ImportFormatError(f"{where or name}: no speaker labels found: no user and assistant turns (labels seen: {common}); "
                                "pass --user-label NAME --assistant-label NAME")
    at = {c.line: c for c in speakers}
    convs: list[list] = [[front.get("title") or front.get("aliases") or "", []]]
    fence, quoted, between, preamble = None, False, 0, 0
    for n in range(start, len(lines)):
        line = lines[n]
        if n in at:
            c = at[n]
            quoted = c.quoted
            convs[-1][1].append([c.role, [c.rest] if c.rest else [], n])
            fence = None
            continue
        bare = re.sub(r"^\s*>\s?", "", line) if quoted and line.lstrip().startswith(">") else line
        f = _FENCE.match(bare)
        if f:
            fence = None if fence == f.group(1) else (fence or f.group(1))
        if not fence and not (quoted and line.lstrip().startswith(">")):
            h1 = re.match(r"^#\s+(\S.*)$", line)
            if h1 and (not convs[-1][1] or _starts_conversation(convs[-1][1], at, n)):
                title = _strip_decoration(h1.group(1))[0] or h1.group(1).strip()
                if convs[-1][1]:
                    convs.append([title, []])
                else:
                    convs[-1][0] = convs[-1][0] or title
                continue
        turns = convs[-1][1]
        if not turns:
            if line.strip() and not _RULE.match(line) and not _is_comment(line.strip()):
                preamble += 1
            continue
        if quoted:
            if line.lstrip().startswith(">"):
                turns[-1][1].append(bare)
            elif line.strip() and not _RULE.match(line) and not _is_comment(line.strip()) \
                    and not _DATE_ONLY.match(line) and not line.startswith("#"):
                between += 1
            continue
        turns[-1][1].append(line)
    changes.add("lines outside a quoted turn dropped", between)
    changes.add("lines before the first turn not imported (metadata, notes)", preamble)
    out = []
    for index, (title, turns) in enumerate(convs):
        if not turns:
            continue
        result, speaker = [], "user"
        labels = {c.line: c.label for c in speakers}
        for role, body, line in turns:
            text = clean_turn(_tidy(body, changes), changes, repair=repair)
            if role == "attachment":
                result.append(Turn("attachment", text, labels.get(line, ""), role=speaker))
                continue
            speaker = role if role in ("user", "assistant") else speaker
            result.append(Turn("tool_result" if role == "tool" else role, text))
        title = clean_turn(title, Changes(), repair=repair) if title else ""
        cid = front.get("conversation_id") if len(convs) == 1 else None
        if not cid:
            first = result[0].text[:200] if result else ""
            cid = "md-" + hashlib.sha256(f"{name}\n{index}\n{title}\n{first}".encode()).hexdigest()[:16]
        meta = {"title": title} if title else {}
        out.append((cid, meta, result))
    return out, learned


def _starts_conversation(turns: list, at: dict, n: int) -> bool:
    """A ``# `` heading inside a conversation starts the next one when the last turn is the
    assistant's and the next speaker line, a few short lines on, is the user's."""
    if turns[-1][0] != "assistant":
        return False
    nxt = min((k for k in at if k > n), default=None)
    return nxt is not None and nxt - n <= 12 and at[nxt].role in ("user", "system")
