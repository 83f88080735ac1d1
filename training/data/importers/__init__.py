"""Importers: the chat data users have -> duet's canonical chat JSONL (or canonical DPO JSONL).

Formats (``--format``; ``auto`` detects them from the content, never the file name, and says what
it found):

- ``chatgpt``: ChatGPT's data export ``conversations.json`` (or the export's zip), see chatgpt.py;
- ``claude``: Claude's data export ``conversations.json`` (or its zip), see claude.py;
- ``markdown``: transcripts whose speaker labels are learned from the file, see markdown.py;
- ``jsonl``, ``sharegpt``, ``alpaca``, ``dpo``: one record an item, see simple.py.

Exports (chatgpt, claude, markdown) become one record per conversation, user-first and
assistant-last, split at turn boundaries when longer than ``max_len`` tokens, with an id from the
source (the conversation id, ``-part<k>`` when split); tool turns, attachments and images follow
``tools`` (conversation.py); citation markers and private-use characters are removed and mojibake
is repaired (text.py). Every change is counted by reason in ``ImportResult.changes``; every item
that could not be imported is in ``skipped``. A JSON export is streamed (bounded memory) and the
output is written atomically: a refused import writes nothing.

Canonical chat record: ``{"id", "messages": [{"role", "content"}], "metadata": {"source", ...}}``.
Canonical DPO record: ``{"id", "prompt": [messages], "chosen": [assistant message],
"rejected": [assistant message], "metadata": {...}}`` (TRL's conversational preference format).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.data.schema import max_turn_chars
from training.data.importers import chatgpt, claude, markdown, simple
from training.data.importers.conversation import TOOLS_MODES, to_records
from training.data.importers.source import ImportFormatError, Source, _Skip
from training.data.importers.text import Changes

FORMATS = ("auto", "chatgpt", "claude", "markdown", "jsonl", "sharegpt", "alpaca", "dpo")
EXPORTS = ("chatgpt", "claude", "markdown")
MAX_LEN = 8192       # tokens (estimated unless a tokenizer counts): longer conversations are split
MAX_SKIPPED = 200    # skipped items listed one by one (all are counted)
MAX_ID = 200
DETECT_SKIPS = 100   # unreadable items passed over before the format is told from the next one

__all__ = ["FORMATS", "TOOLS_MODES", "ImportFormatError", "ImportResult", "Options", "detect", "import_file",
           "import_to", "check_output"]


@dataclass
class Options:
    tools: str = "drop"                       # drop | fold | keep
    max_len: int | None = MAX_LEN             # None: never split
    count_tokens: object = None               # record -> tokens (a tokenizer); None: estimated
    user_labels: tuple[str, ...] = ()         # Markdown overrides
    assistant_labels: tuple[str, ...] = ()
    repair: bool = True                       # mojibake repair


@dataclass
class ImportResult:
    format: str
    detected: bool
    how: str = ""                             # what the detection saw
    records: list[dict] = field(default_factory=list)
    count: int = 0                            # records written
    conversations: int = 0                    # items (conversations, lines) read
    changes: Changes = field(default_factory=Changes)
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason"}, the first MAX_SKIPPED
    skipped_count: int = 0
    labels: dict = field(default_factory=dict)  # Markdown: "style label" -> role (how it was found)
    source_name: str = ""
    files: list = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_SKIPPED:
            self.skipped.append({"where": where, "reason": reason})

    def to_dict(self) -> dict:
        return {"format": self.format, "detected": self.detected, "how": self.how, "files": self.files,
                "conversations": self.conversations,
                "records": self.count, "changes": dict(sorted(self.changes.items())), "skipped": self.skipped,
                "skipped_count": self.skipped_count, "labels": self.labels}


_HINTS = {
    frozenset({"uuid", "full_name", "email_address"}): "Claude's users.json (no chats); import conversations.json",
    frozenset({"uuid", "name", "docs"}): "Claude's projects.json (no chats); import conversations.json",
    frozenset({"id", "email", "chatgpt_plus_user"}): "ChatGPT's user.json (no chats); import conversations.json",
    frozenset({"id", "conversation_id", "title", "is_anonymous"}):
        "ChatGPT's shared_conversations.json (links, no chats); import conversations.json",
    frozenset({"id", "conversation_id", "user_id", "rating"}): "ChatGPT's message_feedback.json; import conversations.json",
}


def _classify(obj: object, where: str) -> tuple[str, str]:
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):  # a JSONL line holding a whole list
        obj = obj[0]
    if not isinstance(obj, dict):
        raise ImportFormatError(f"{where}: cannot tell the format: a JSON {type(obj).__name__}, not an object; "
                                f"pass --format {'|'.join(FORMATS[1:])}")
    keys = set(obj)
    if "mapping" in keys and ("current_node" in keys or "title" in keys):
        return "chatgpt", "ChatGPT export (conversations with a 'mapping' tree)"
    if "chat_messages" in keys:
        return "claude", "Claude export (conversations with 'chat_messages')"
    if {"chosen", "rejected"} <= keys:
        return "dpo", "preference pairs ('prompt', 'chosen', 'rejected')"
    if "conversations" in keys:
        return "sharegpt", "ShareGPT ('conversations' with from/value)"
    if "instruction" in keys and "output" in keys:
        return "alpaca", "Alpaca ('instruction', 'output')"
    if "messages" in keys:
        return "jsonl", "chat records ('messages' with role/content)"
    for sig, hint in _HINTS.items():
        if sig <= keys:
            raise ImportFormatError(f"{where}: this is {hint}")
    raise ImportFormatError(f"{where}: cannot tell the format (keys {sorted(keys)[:12]}); "
                            f"pass --format {'|'.join(FORMATS[1:])}")


def detect(src: str | os.PathLike | Source) -> tuple[str, str]:
    """(format, what was seen) from the file's content; ImportFormatError when it is none of them."""
    source = src if isinstance(src, Source) else Source(src)
    first = source.first_char()
    if not first:
        raise ImportFormatError(f"{source.where()}: empty")
    if first in "[{":
        items = source.items()
        skipped = 0
        try:
            where, obj = next(items)
            while isinstance(obj, _Skip) and skipped < DETECT_SKIPS:  # the first item that can be read tells
                skipped += 1
                where, obj = next(items)
        except StopIteration:
            if skipped:
                raise ImportFormatError(f"{where}: {obj.reason}") from None
            raise ImportFormatError(f"{source.where()}: an empty JSON list") from None
        except ImportFormatError:
            if source.is_zip:
                raise
            try:  # Markdown that opens with a link or a brace
                markdown.conversations(source.text()[0], source.name, Changes(), overrides={})
                return "markdown", "text with speaker lines"
            except ImportFormatError:
                pass
            raise
        finally:
            items.close()
        if isinstance(obj, _Skip):
            raise ImportFormatError(f"{where}: {obj.reason}")
        fmt, how = _classify(obj, where)
        return fmt, how + (f", in the zip member {source.member.filename}" if source.is_zip else "")
    if source.is_zip:
        raise ImportFormatError(f"{source.where()}: the archive's conversations.json is not JSON")
    return "markdown", "text with speaker lines"


def _safe_id(cid: str | None, fallback: str) -> str:
    cid = (cid or "").strip()
    if not cid:
        return fallback
    if len(cid) > MAX_ID:
        return cid[:MAX_ID - 17] + "-" + hashlib.sha256(cid.encode()).hexdigest()[:16]
    return cid


def _storable(rec: dict, res: ImportResult, limit: int) -> bool:
    try:
        json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        res.skip(str(rec.get("id")), "not valid Unicode (a lone surrogate escape)")
        return False
    turns = [m for k in ("messages", "prompt", "chosen", "rejected") for m in (rec.get(k) or [])
             if isinstance(m, dict) and isinstance(m.get("content"), str)]
    big = max((len(m["content"]) for m in turns), default=0)
    if big > limit:
        res.skip(str(rec.get("id")), f"a turn of {big:,} characters, above the limit of {limit:,} "
                                     "(DUET_MAX_TURN_CHARS raises it)")
        return False
    return True


def _overrides(opts: Options) -> dict[str, str]:
    out = {x.strip().lower(): "user" for x in opts.user_labels if x.strip()}
    out.update({x.strip().lower(): "assistant" for x in opts.assistant_labels if x.strip()})
    return out


def _export_records(res: ImportResult, opts: Options, convs) -> Iterator[dict]:
    """Records of an export's conversations: ``convs`` yields (where, (cid, meta, turns)) or
    (where, ImportFormatError)."""
    for where, item in convs:
        res.conversations += 1
        if isinstance(item, Exception):
            res.skip(where, str(item))
            continue
        cid, meta, turns = item
        fallback = simple.stable_id(res.format, [where.rsplit("[", 1)[-1], [(t.kind, t.text) for t in turns][:4]])
        meta = {"source": res.source_name, "format": res.format, **meta}
        if cid:
            meta["conversation_id"] = cid
        recs, why = to_records(turns, base_id=_safe_id(cid, fallback), meta=meta, tools=opts.tools,
                               changes=res.changes, max_len=opts.max_len, count_tokens=opts.count_tokens)
        if why:
            res.skip(where, why)
        yield from recs


def _named(where: str, obj: object) -> str:
    """``where`` with the conversation's own id when it has one (what a person searches for)."""
    cid = obj.get("uuid") or obj.get("conversation_id") or obj.get("id") if isinstance(obj, dict) else None
    return f"{where} (id {cid[:80]})" if isinstance(cid, str) and cid.strip() else where


def _records(source: Source, res: ImportResult, opts: Options) -> Iterator[dict]:
    fmt = res.format
    if fmt == "markdown":
        text, enc = source.text()
        if enc != "utf-8":
            res.changes.add(f"file read as {enc} (not UTF-8)")
        convs, learned = markdown.conversations(text, source.name, res.changes, overrides=_overrides(opts),
                                                repair=opts.repair, where=source.where())
        res.labels = learned.labels
        yield from _export_records(res, opts, ((f"{source.where()}#{i + 1}", c) for i, c in enumerate(convs)))
        return
    if fmt in ("chatgpt", "claude"):
        mod = chatgpt if fmt == "chatgpt" else claude

        def convs():
            for where, obj in source.items():
                if isinstance(obj, _Skip):
                    yield where, ImportFormatError(obj.reason)
                    continue
                try:
                    yield where, mod.conversation(obj, res.changes, repair=opts.repair)
                except ImportFormatError as exc:
                    yield _named(where, obj), exc
                except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as exc:
                    # one malformed conversation (a field of the wrong shape) is skipped and named;
                    # the rest of the export is imported
                    yield _named(where, obj), ImportFormatError(f"malformed conversation ({type(exc).__name__}: "
                                                                f"{str(exc)[:160]})")
        yield from _export_records(res, opts, convs())
        return
    fn = simple.FUNCS[fmt]
    for where, obj in source.items():
        res.conversations += 1
        if isinstance(obj, _Skip):
            res.skip(where, obj.reason)
            continue
        try:
            yield from fn(obj, source.name)
        except ImportFormatError as exc:
            res.skip(where, str(exc))


def _start(src, fmt: str, opts: Options | None, on_progress) -> tuple[Source, ImportResult, Options]:
    opts = opts or Options()
    if fmt not in FORMATS:
        raise ImportFormatError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if opts.tools not in TOOLS_MODES:
        raise ImportFormatError(f"--tools {opts.tools!r} is not one of {', '.join(TOOLS_MODES)}")
    if opts.max_len is not None and (not isinstance(opts.max_len, int) or opts.max_len < 1):
        raise ImportFormatError(f"--max-len {opts.max_len!r}: a positive number of tokens")
    source = Source(src)
    detected = fmt == "auto"
    how = ""
    if detected:
        fmt, how = detect(source)
    source.on_progress = on_progress  # the import's own pass, not the detection's peek
    res = ImportResult(fmt, detected, how)
    res.source_name = source.name
    return source, res, opts


def _kept(source: Source, res: ImportResult, opts: Options) -> Iterator[dict]:
    """The records of one source that can be stored (the others are skipped with a reason), counted."""
    limit = max_turn_chars()
    for rec in _records(source, res, opts):
        if _storable(rec, res, limit):
            res.count += 1
            yield rec


def _finish(res: ImportResult, source: Source) -> None:
    if res.count:
        return
    first = f": {res.skipped[0]['where']}: {res.skipped[0]['reason']}" if res.skipped else ""
    raise ImportFormatError(f"{source.where()}: no record could be imported as {res.format} "
                            f"({res.skipped_count} skipped{first})")


def import_file(src: str | os.PathLike, fmt: str = "auto", options: Options | None = None, *,
                user_labels: tuple[str, ...] = (), assistant_labels: tuple[str, ...] = (),
                on_progress=None) -> ImportResult:
    """Import ``src`` into memory (``result.records``). ImportFormatError for a file that is not the
    format it claims, or that yields no record at all; items that cannot be read are skipped with a
    reason."""
    if options is None:
        options = Options(user_labels=tuple(user_labels), assistant_labels=tuple(assistant_labels))
    source, res, opts = _start(src, fmt, options, on_progress)
    res.records = list(_kept(source, res, opts))
    _finish(res, source)
    return res


IMPORTABLE = (".json", ".jsonl", ".md", ".markdown", ".txt", ".zip")


def sources(srcs: list[str | os.PathLike]) -> list[Path]:
    """The files to import: each file given, and the importable files under each folder given
    (sorted; hidden files and folders skipped)."""
    out: list[Path] = []
    for s in srcs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMPORTABLE
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ImportFormatError(f"{p}: a folder without any {', '.join(IMPORTABLE)} file")
            out += found
        else:
            out.append(p)
    return out


def _merge_result(total: ImportResult, res: ImportResult) -> None:
    total.conversations += res.conversations
    total.count += res.count
    total.changes.update(res.changes)
    for s in res.skipped:
        total.skip(s["where"], s["reason"])
    total.skipped_count += res.skipped_count - len(res.skipped)
    for k, v in res.labels.items():
        total.labels.setdefault(k, v)


def import_to(src: str | os.PathLike | list, out: str | os.PathLike, fmt: str = "auto", options: Options | None = None,
              *, on_progress=None) -> ImportResult:
    """Import ``src`` (a file, or a list of files and folders) straight into ``out`` (streamed:
    memory stays bounded for any export size), written atomically: on any error, or when no record
    came out, ``out`` is left as it was. With one file, a file that cannot be imported refuses the
    import; with several, it is reported as skipped and the others are imported."""
    many = isinstance(src, (list, tuple)) and (len(src) != 1 or Path(src[0]).is_dir())
    files = sources(src if isinstance(src, (list, tuple)) else [src])
    for f in files:
        check_output(f, out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    results: list[ImportResult] = []
    total: ImportResult | None = None
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for f in files:
                try:
                    source, res, opts = _start(f, fmt, options, on_progress)
                    for rec in _kept(source, res, opts):
                        fh.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
                    if not many:
                        _finish(res, source)
                except ImportFormatError as exc:
                    if not many:
                        raise
                    if total is None:
                        total = ImportResult("mixed", fmt == "auto")
                    total.skip(str(f), str(exc))
                    continue
                results.append(res)
        if many:
            total = total or ImportResult("mixed", fmt == "auto")
            formats = sorted({r.format for r in results})
            total.format = formats[0] if len(formats) == 1 else "mixed"
            total.how = "; ".join(f"{r.source_name}: {r.format}" for r in results)
            for r in results:
                _merge_result(total, r)
            if not total.count:
                first = f": {total.skipped[0]['where']}: {total.skipped[0]['reason']}" if total.skipped else ""
                raise ImportFormatError(f"no record could be imported from {len(files)} files{first}")
        else:
            total = results[0]
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    total.files = [str(f) for f in files]
    return total


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
