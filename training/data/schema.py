"""The chat record schema and its checks: what a canonical record is, how a JSONL file is read
(bounded line and nesting sizes, one problem per bad line), and ``check_record``'s problems, each
naming the line and field. Curation and versions are in training/data/dataset.py.

The canonical record (the seed's format)::

    {"id": "maya-001",
     "messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...],
     "metadata": {"category": "style|facts|decisions", "source": "...", "quality": "..."}}

A DPO record has ``prompt``, ``chosen`` and ``rejected`` instead of ``messages``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's result, between assistant turns
CATEGORIES = ("style", "facts", "decisions")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class DatasetError(ValueError):
    """Bad dataset input. ``problems`` lists every problem found, each naming file and line."""

    def __init__(self, message: str, problems: list["Problem"] | None = None):
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record."""

    file: str
    line: int
    record_id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        rid = f" (id {self.record_id})" if self.record_id else ""
        return f"{self.file}:{self.line}{rid}: {self.field}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "id": self.record_id,
                "field": self.field, "message": self.message}


@dataclass
class Record:
    """A parsed line: the record when it parsed, and where it came from."""

    file: str
    line: int
    data: dict | None
    raw: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.data is not None and not self.problems

    @property
    def record_id(self) -> str | None:
        if isinstance(self.data, dict) and isinstance(self.data.get("id"), str):
            return self.data["id"]
        return None


MAX_TURN_CHARS = 1_000_000  # one message's text; DUET_MAX_TURN_CHARS overrides
MAX_JSON_DEPTH = 64         # nesting of one record; DUET_MAX_JSON_DEPTH overrides
MAX_LINE_ERRORS = 20        # lines named in the error when a file is refused whole
MAX_LINE_BYTES = 64 << 20   # one JSONL line; DUET_MAX_LINE_BYTES overrides


def _limit(var: str, default: int) -> int:
    raw = os.environ.get(var, "")
    if not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise DatasetError(f"{var}={raw!r}: use a whole number") from exc
    if value < 1:
        raise DatasetError(f"{var}={raw!r}: must be at least 1")
    return value


def max_turn_chars() -> int:
    return _limit("DUET_MAX_TURN_CHARS", MAX_TURN_CHARS)


def max_json_depth() -> int:
    return _limit("DUET_MAX_JSON_DEPTH", MAX_JSON_DEPTH)


def json_depth(obj: object) -> int:
    """Nesting depth of a parsed JSON value (iterative: a hostile file cannot overflow the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str, where: str, max_depth: int | None = None) -> object:
    """json.loads that refuses NaN/Infinity and nesting deeper than ``max_depth``; ValueError naming
    ``where`` (and the line and column for a syntax error)."""
    limit = max_depth or max_json_depth()

    def bad_constant(name: str):
        raise ValueError(f"{where}: {name} is not a JSON number")

    try:
        obj = json.loads(text, parse_constant=bad_constant)
    except RecursionError as exc:
        raise ValueError(f"{where}: nested deeper than {limit} levels (DUET_MAX_JSON_DEPTH)") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
    if json_depth(obj) > limit:
        raise ValueError(f"{where}: nested deeper than {limit} levels (DUET_MAX_JSON_DEPTH raises the limit)")
    return obj


def input_file(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """A data file given as input: it must exist and be a regular file, and when it is a symlink its
    target must stay inside ``folder`` (default: the folder the link is in). DatasetError otherwise."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file")
    if not p.is_file():
        raise DatasetError(f"{p}: not a regular file (a folder, device or pipe); give a JSONL file")
    if p.is_symlink():
        root = Path(folder).resolve() if folder else p.absolute().parent.resolve()
        real = p.resolve()
        if root not in real.parents:
            raise DatasetError(f"{p}: a symlink to {real}, outside {root}; refusing it (copy the file here instead)")
    return p


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read a chat/DPO JSONL file: one JSON object a line (UTF-8, a byte-order mark and CRLF line
    ends are fine). A file that is not that (a binary file, a line that is not UTF-8, not JSON or not
    an object) is refused whole with DatasetError naming its lines, so no foreign content ever
    reaches a dataset or its quarantine. Records that parse come back with ``problems`` empty; the
    schema is checked by ``check_records``."""
    records, bad = scan_jsonl(path)
    refuse_bad_lines(bad)
    return records


def refuse_bad_lines(bad: list[Problem]) -> None:
    """DatasetError naming a file's lines that are not JSON objects, when there are any: the file is
    refused whole."""
    if bad:
        more = " (and possibly more)" if len(bad) >= MAX_LINE_ERRORS else ""
        raise DatasetError(f"{bad[0].file}: not a chat/DPO JSONL file: {len(bad)} line(s) are not JSON objects{more}; "
                           "the file is refused whole (nothing of it was stored)", bad)


def scan_jsonl(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """``read_jsonl`` without the refusal: the records that parsed, and a problem for each line that
    did not (at most MAX_LINE_ERRORS), for ``duet data check`` to report everything at once."""
    bad: list[Problem] = []
    return list(iter_jsonl(path, bad)), bad


def iter_jsonl(path: str | os.PathLike, bad: list[Problem]) -> Iterator[Record]:
    """The records of ``scan_jsonl`` one at a time (a file's size never in memory); each line that is
    not a JSON object is appended to ``bad`` instead, and reading stops after MAX_LINE_ERRORS of them."""
    path = input_file(path)
    depth = max_json_depth()
    max_line = _limit("DUET_MAX_LINE_BYTES", MAX_LINE_BYTES)
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DatasetError(f"{path}: UTF-16 text; a JSONL file is UTF-8 (convert it, e.g. "
                               f"iconv -f utf-16 -t utf-8 {path.name} > {path.stem}.utf8.jsonl)",
                               [Problem(str(path), 1, None, "<file>", "UTF-16, not UTF-8")])
        lineno = 0
        while True:
            rawb = fh.readline(max_line + 1)
            if not rawb:
                break
            lineno += 1
            if len(rawb) > max_line and not rawb.endswith(b"\n"):
                bad.append(Problem(str(path), lineno, None, "<line>", f"longer than {max_line:,} bytes "
                                   "(DUET_MAX_LINE_BYTES raises the limit)"))
                while rawb and not rawb.endswith(b"\n"):  # skip the rest of that line without holding it
                    rawb = fh.readline(1 << 20)
                continue
            if lineno == 1 and rawb.startswith(b"\xef\xbb\xbf"):
                rawb = rawb[3:]
            if not rawb.strip():
                continue
            if b"\x00" in rawb:
                bad.append(Problem(str(path), lineno, None, "<line>", "binary data (NUL bytes): not a JSONL file"))
            else:
                try:
                    raw = rawb.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.append(Problem(str(path), lineno, None, "<line>",
                                       f"not UTF-8 ({exc.reason} at byte {exc.start}); convert the file to UTF-8"))
                else:
                    try:
                        data = parse_json(raw, f"{path}:{lineno}", depth)
                    except ValueError as exc:
                        msg = str(exc).split(": ", 1)[-1] if str(exc).startswith(str(path)) else str(exc)
                        bad.append(Problem(str(path), lineno, None, "<line>", msg))
                    else:
                        if isinstance(data, dict):
                            yield Record(str(path), lineno, data, raw)
                        else:
                            bad.append(Problem(str(path), lineno, None, "<line>",
                                               f"a JSON {type(data).__name__}, not an object: a JSONL dataset holds "
                                               "one object a line"))
            if len(bad) >= MAX_LINE_ERRORS:
                break


def _check_messages(msgs: object, fld: str, bad, *, need_user: bool, end_assistant: bool) -> None:
    if msgs is None:
        bad(fld, "missing (a list of {role, content} objects is required)")
        return
    if not isinstance(msgs, list) or not msgs:
        bad(fld, "must be a non-empty list")
        return
    for i, m in enumerate(msgs):
        where = f"{fld}[{i}]"
        if not isinstance(m, dict):
            bad(where, "must be an object with role and content")
            continue
        role = m.get("role")
        if role not in ROLES:
            bad(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        elif role == "system" and i != 0:
            bad(f"{where}.role", "a system message is allowed only first")
        elif role == "tool" and (i == 0 or i == len(msgs) - 1):
            bad(f"{where}.role", "a tool message comes between assistant turns, never first or last")
        content = m.get("content")
        if not isinstance(content, str):
            bad(f"{where}.content", "must be a string")
        elif not content.strip():
            bad(f"{where}.content", "is empty")
        elif len(content) > max_turn_chars():
            bad(f"{where}.content", f"{len(content):,} characters, above the limit of {max_turn_chars():,} "
                                    "(DUET_MAX_TURN_CHARS raises it)")
        elif not _valid_unicode(content):
            bad(f"{where}.content", "not valid Unicode (a lone surrogate escape such as \\ud800)")
        elif content.count(THINK_OPEN) != content.count(THINK_CLOSE):
            bad(f"{where}.content", "unbalanced <think> tags")
    roles = [m.get("role") for m in msgs if isinstance(m, dict)]
    if end_assistant and roles and roles[-1] != "assistant":
        bad(fld, "the conversation must end with an assistant message")
    if need_user and "user" not in roles:
        bad(fld, "needs at least one user message")


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def record_text(d: dict) -> str:
    """All message text of a chat or DPO record (for lengths and similarity)."""
    parts = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        v = d.get(key)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts += [m.get("content", "") for m in v if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return "\n".join(parts)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 characters a token for English); callers say it is one."""
    return max(1, round(len(text) / 4))


def is_dpo(d: object) -> bool:
    return isinstance(d, dict) and "chosen" in d and "rejected" in d


def check_record(rec: Record, max_tokens: int | None = None, count_tokens=None) -> list[Problem]:
    """Every problem of one parsed record, chat or DPO (empty when valid).

    ``count_tokens(record) -> int`` counts with the model's tokenizer; without it the length check
    uses ``estimate_tokens`` and says so.
    """
    if rec.data is None:
        return list(rec.problems)
    f, ln, d = rec.file, rec.line, rec.data
    if not isinstance(d, dict):
        return [Problem(f, ln, None, "<record>", f"expected a JSON object, got {type(d).__name__}")]
    rid = rec.record_id
    out: list[Problem] = []

    def bad(fld: str, msg: str) -> None:
        out.append(Problem(f, ln, rid, fld, msg))

    try:
        json.dumps(d, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError) as exc:
        bad("<record>", f"cannot be stored: {'not valid Unicode (a lone surrogate escape)' if isinstance(exc, UnicodeEncodeError) else exc}")
        return out
    if "id" not in d:
        bad("id", "missing (a unique string is required)")
    elif not isinstance(d["id"], str) or not d["id"].strip():
        bad("id", "must be a non-empty string")
    elif len(d["id"]) > 256:
        bad("id", f"{len(d['id'])} characters; an id has at most 256")
    if is_dpo(d):
        _check_messages(d.get("prompt"), "prompt", bad, need_user=True, end_assistant=False)
        for key in ("chosen", "rejected"):
            _check_messages(d.get(key), key, bad, need_user=False, end_assistant=True)
        if d.get("chosen") == d.get("rejected"):
            bad("rejected", "is identical to chosen (the pair teaches nothing)")
    else:
        _check_messages(d.get("messages"), "messages", bad, need_user=True, end_assistant=True)
    meta = d.get("metadata", {})
    if not isinstance(meta, dict):
        bad("metadata", "must be an object")
    elif "category" in meta and meta["category"] not in CATEGORIES:
        bad("metadata.category", f"{meta['category']!r} is not one of {', '.join(CATEGORIES)}")
    if max_tokens is not None and not out:
        if count_tokens is not None:
            n, how = count_tokens(d), "tokens"
        else:
            n, how = estimate_tokens(record_text(d)), "tokens (estimated at ~4 characters a token; give a tokenizer to count exactly)"
        if n > max_tokens:
            bad("messages" if not is_dpo(d) else "chosen", f"{n} {how}, above the maximum sequence length {max_tokens}")
    return out


def check_records(records: list[Record], max_tokens: int | None = None, count_tokens=None) -> list[Problem]:
    """Check every record, including duplicate ids across all files; fills ``rec.problems``."""
    return [p for rec in checked(records, max_tokens, count_tokens) for p in rec.problems]


def checked(records: Iterable[Record], max_tokens: int | None = None, count_tokens=None) -> Iterator[Record]:
    """Each record with ``problems`` filled, one at a time (a duplicate id is a problem of the later
    record, across everything this iterator has seen)."""
    seen: dict[str, tuple[str, int]] = {}
    for rec in records:
        rec.problems = check_record(rec, max_tokens, count_tokens)
        rid = rec.record_id
        if rid is not None and rec.data is not None:
            if rid in seen:
                file, line = seen[rid]
                rec.problems.append(Problem(rec.file, rec.line, rid, "id", f"duplicate id, first seen at {file}:{line}"))
            else:
                seen[rid] = (rec.file, rec.line)
        yield rec


def is_reasoning(data: dict) -> bool:
    """A record 'reasons' when an assistant turn carries a <think> block."""
    return any(m.get("role") == "assistant" and THINK_OPEN in m.get("content", "")
               for m in data.get("messages", []))
