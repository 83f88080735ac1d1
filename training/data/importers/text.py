"""Cleaning the text of chat exports: citation markers, private-use characters, mojibake.

Every change is counted in a ``Changes`` counter under a reason a person can read; the import
reports them all (nothing is dropped or changed silently).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import ftfy

# Reasons (the keys of Changes), written once so the report, the JSON and the tests agree.
CITATIONS = "citation markers removed"
ENTITIES = "entity markers replaced by their name"
PRIVATE_USE = "private-use characters removed"
REPAIRED = "turns repaired (mojibake)"
UNSUPPORTED_BLOCKS = "'not supported on your device' placeholders removed"


class Changes(Counter):
    """reason -> count, for one import."""

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self[reason] += n


# ChatGPT's inline references: U+E200 kind (U+E202 argument)* U+E201, e.g.
# "\ue200cite\ue202turn0search3\ue202turn1news2\ue201" or "\ue200entity\ue202["people","Ada Lovelace"]\ue201".
_PUA_REF = re.compile("(?<![ \t])[ \t]*+\ue200([^\ue200\ue201\ue202]{0,64})((?:\ue202[^\ue200\ue201\ue202]*)*)\ue201")
# The older form: 【6†source】, 【4:0†notes.pdf】, 【11†L1-L5】, 【turn0search3】 (CJK brackets used as
# ordinary punctuation, 【お知らせ】, have neither a dagger nor a turn reference and stay).
_BRACKET_REF = re.compile(r"(?<![ \t])[ \t]*+【(?:[^【】\n]{0,200}†[^【】\n]{0,200}|turn\d+[a-z]+\d+(?:[^【】\n]{0,80}))】")
_PUA = re.compile("[\ue000-\uf8ff]")
# The same references once something stripped their private-use characters: "citeturn0search3turn1news2",
# "filecite turn0file1", 'entity["people","Ada Lovelace","..."]'.
_BARE_CITE = re.compile(r"(?<![ \t])[ \t]*+\b(?:file)?cite\s?(?:turn\d+[a-z]+\d+(?:L\d+-L\d+)?)+")
_BARE_ENTITY = re.compile(r'\bentity\[\s*"[^"\n]{1,40}"\s*,\s*"([^"\n]{1,120})"[^\]\n]{0,400}\]')
_UNSUPPORTED = re.compile(r"(?:```[ \t]*\n)?This block is not supported on your current device yet\.(?:\n```)?")


def _entity_name(arg: str) -> str | None:
    try:
        val = json.loads(arg)
    except ValueError:
        return None
    if isinstance(val, list) and len(val) > 1 and isinstance(val[1], str) and val[1].strip():
        return val[1].strip()
    if isinstance(val, dict) and isinstance(val.get("name"), str):
        return val["name"].strip() or None
    return None


def remove_citations(text: str, changes: Changes) -> str:
    """Citation and reference markers out of an export's text: cited sources are removed (the model
    cannot produce the search result they point at), entity references become the name they show."""
    if "\ue200" in text:
        def ref(m: re.Match) -> str:
            kind, args = m.group(1), [a for a in m.group(2).split("\ue202") if a]
            if kind == "entity" and args:
                name = _entity_name(args[0])
                if name:
                    changes.add(ENTITIES)
                    lead = m.group(0)[:len(m.group(0)) - len(m.group(0).lstrip(" \t"))]
                    return lead + name
            changes.add(CITATIONS)
            return ""
        text = _PUA_REF.sub(ref, text)
    if "turn" in text and "cite" in text:
        text, n = _BARE_CITE.subn("", text)
        changes.add(CITATIONS, n)
    if "entity[" in text:
        text, n = _BARE_ENTITY.subn(lambda m: m.group(1), text)
        changes.add(ENTITIES, n)
    if "【" in text:
        text, n = _BRACKET_REF.subn("", text)
        changes.add(CITATIONS, n)
    if _PUA.search(text):
        text, n = _PUA.subn("", text)
        changes.add(PRIVATE_USE, n)
    return text


def remove_unsupported_blocks(text: str, changes: Changes) -> str:
    """Claude's text field stands "This block is not supported on your current device yet." where an
    artifact or a tool call was; the content parts hold the real thing."""
    if "not supported on your current device" not in text:
        return text
    text, n = _UNSUPPORTED.subn("", text)
    changes.add(UNSUPPORTED_BLOCKS, n)
    return re.sub(r"\n{3,}", "\n\n", text)


# UTF-8 read as Mac Roman: every Cyrillic, Greek, Hebrew... letter turns into two characters, a lead
# (Mac Roman 0xC2-0xDF: – — ¬ √ ƒ ≈ ...) and a continuation (0x80-0xBF: Ä Å Ç É ... ∞ ∑ π ...); an
# emoji into four (the Apple logo U+F8FF and three more). ftfy's detector does not flag the two- and
# four-byte forms (they look like punctuation and letters), so duet finds them and asks Python's own
# codec to undo them, word by word, only where the bytes decode as UTF-8.
def _mac(lo: int, hi: int) -> str:
    return re.escape("".join(bytes([b]).decode("mac_roman") for b in range(lo, hi)))


_CONT = f"[{_mac(0x80, 0xC0)}]"
_MAC_SEQ = re.compile(f"[{_mac(0xC2, 0xE0)}]{_CONT}|[{_mac(0xE0, 0xF0)}]{_CONT}{{2}}|[{_mac(0xF0, 0xF5)}]{_CONT}{{3}}")
_WORD = re.compile(r"\S+")


def _mac_roman_fix(text: str) -> str:
    seqs = _MAC_SEQ.findall(text)
    if not seqs or (len(seqs) < 3 and all(len(q) == 2 for q in seqs)):  # a pair or two can be real text
        return text

    def word(m: re.Match) -> str:
        w = m.group(0)
        if not _MAC_SEQ.search(w):
            return w
        try:
            fixed = w.encode("mac_roman").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return w
        if _PUA.search(fixed) or any(0x80 <= ord(c) < 0xA0 for c in fixed):
            return w
        return fixed
    return _WORD.sub(word, text)


def repair_mojibake(text: str) -> str:
    """UTF-8 text that was decoded with the wrong codec, put right: ftfy for cp1252/latin-1 and the
    other encodings it detects, then the Mac Roman form above. Text that is fine comes back as is."""
    if text.isascii():
        return text
    fixed = ftfy.fix_encoding(text)
    return _mac_roman_fix(fixed)


def clean_turn(text: str, changes: Changes, *, repair: bool = True) -> str:
    """The text of one turn of an export: line ends normalised, markers out, mojibake repaired."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if repair:
        fixed = repair_mojibake(text)
        if fixed != text:
            changes.add(REPAIRED)
            text = fixed
    text = remove_citations(text, changes)
    return text.strip()
