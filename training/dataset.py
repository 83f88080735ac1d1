"""Chat datasets: read, check, split and version.

A dataset version lives in ``datasets/<name>/<hash>/`` of the workspace:

- ``train.jsonl``, ``test.jsonl``: canonical chat records (one JSON object a line);
- ``quarantine.jsonl``: records that failed the check, each with its problems (never dropped);
- ``manifest.json``: counts, per-category counts, reasoning/direct balance, sources with their
  sha256, and ``content_hash``, the sha256 over train + test, which names the folder.

Invariants: a version folder is written to a temp folder and renamed into place, so it is either
complete or absent; the same inputs and seed give the same hash; no record id (nor an identical
conversation) appears in both train and test.

The canonical record (the seed's format)::

    {"id": "maya-001",
     "messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...],
     "metadata": {"category": "style|facts|decisions", "source": "...", "quality": "..."}}
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
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
    if bad:
        more = " (and possibly more)" if len(bad) >= MAX_LINE_ERRORS else ""
        raise DatasetError(f"{bad[0].file}: not a chat/DPO JSONL file: {len(bad)} line(s) are not JSON objects{more}; "
                           "the file is refused whole (nothing of it was stored)", bad)
    return records


def scan_jsonl(path: str | os.PathLike) -> tuple[list[Record], list[Problem]]:
    """``read_jsonl`` without the refusal: the records that parsed, and a problem for each line that
    did not (at most MAX_LINE_ERRORS), for ``duet data check`` to report everything at once."""
    path = input_file(path)
    depth = max_json_depth()
    max_line = _limit("DUET_MAX_LINE_BYTES", MAX_LINE_BYTES)
    records: list[Record] = []
    bad: list[Problem] = []
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
                            records.append(Record(str(path), lineno, data, raw))
                        else:
                            bad.append(Problem(str(path), lineno, None, "<line>",
                                               f"a JSON {type(data).__name__}, not an object: a JSONL dataset holds "
                                               "one object a line"))
            if len(bad) >= MAX_LINE_ERRORS:
                break
    return records, bad


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
    seen: dict[str, Record] = {}
    problems: list[Problem] = []
    for rec in records:
        rec.problems = check_record(rec, max_tokens, count_tokens)
        rid = rec.record_id
        if rid is not None and rec.data is not None:
            if rid in seen:
                first = seen[rid]
                rec.problems.append(Problem(rec.file, rec.line, rid, "id",
                                            f"duplicate id, first seen at {first.file}:{first.line}"))
            else:
                seen[rid] = rec
        problems.extend(rec.problems)
    return problems


def is_reasoning(data: dict) -> bool:
    """A record 'reasons' when an assistant turn carries a <think> block."""
    return any(m.get("role") == "assistant" and THINK_OPEN in m.get("content", "")
               for m in data.get("messages", []))


def conversation_key(data: dict) -> str:
    """Identity of a record's content (ignores id and metadata): duplicates share it. For DPO
    records the prompt, chosen and rejected turns all count."""
    keys = ("prompt", "chosen", "rejected") if is_dpo(data) else ("messages",)
    norm = []
    for key in keys:
        v = data.get(key)
        msgs = [{"role": "user", "content": v}] if isinstance(v, str) else (v or [])
        norm.append([(m.get("role"), re.sub(r"\s+", " ", str(m.get("content", ""))).strip().lower())
                     for m in msgs if isinstance(m, dict)])
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dump(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


NEAR_DUP_THRESHOLD = 0.8
_MINHASH_PERMS = 64
_MINHASH_BANDS = 16
_MERSENNE = (1 << 61) - 1


def _shingles(text: str, k: int = 5) -> set[int]:
    words = re.findall(r"\w+", text.lower())
    grams = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))} if len(words) >= 3 else set()
    flat = re.sub(r"\s+", " ", text.lower())
    grams |= {flat[i:i + k] for i in range(max(1, len(flat) - k + 1))} if len(words) < 3 else set()
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big") for g in grams}


def _minhash(sh: set[int], params: list[tuple[int, int]]) -> tuple[int, ...]:
    if not sh:
        return tuple([0] * len(params))
    return tuple(min((a * h + b) % _MERSENNE for h in sh) for a, b in params)


def near_duplicate_pairs(records: list[dict], threshold: float = NEAR_DUP_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of records whose word-3-gram sets overlap at least ``threshold``.

    MinHash (64 permutations) with LSH banding finds candidates; each candidate is confirmed with the
    exact Jaccard similarity, so there are no false positives.
    """
    rng = random.Random(1234)
    params = [(rng.randrange(1, _MERSENNE), rng.randrange(0, _MERSENNE)) for _ in range(_MINHASH_PERMS)]
    shingles = [_shingles(record_text(r)) for r in records]
    sigs = [_minhash(sh, params) for sh in shingles]
    rows = _MINHASH_PERMS // _MINHASH_BANDS
    cands: set[tuple[int, int]] = set()
    for b in range(_MINHASH_BANDS):
        buckets: dict[tuple, list[int]] = {}
        for i, sig in enumerate(sigs):
            buckets.setdefault(sig[b * rows:(b + 1) * rows], []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    cands.add((members[x], members[y]))
    out = []
    for i, j in sorted(cands):
        a, b = shingles[i], shingles[j]
        if a and b:
            jac = len(a & b) / len(a | b)
            if jac >= threshold:
                out.append((i, j, round(jac, 3)))
    return out


def _groups(records: list[dict], near_pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    """Union-find over identical conversations and near-duplicate pairs: each group is split as one."""
    parent = list(range(len(records)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[str, int] = {}
    for i, r in enumerate(records):
        k = conversation_key(r)
        if k in first:
            parent[find(i)] = find(first[k])
        else:
            first[k] = i
    for i, j, _ in near_pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: min(records[i]["id"] for i in g))


def split(records: list[dict], test_frac: float, seed: int,
          near_pairs: list[tuple[int, int, float]] | None = None) -> tuple[list[dict], list[dict]]:
    """Leakage-free split stratified by category.

    Identical and near-duplicate conversations form groups that land wholly in train or in test.
    Deterministic for the same records, seed and fraction.
    """
    if isinstance(test_frac, bool) or not isinstance(test_frac, (int, float)) or not 0.0 < test_frac < 1.0:
        raise DatasetError(f"test_frac must be between 0 and 1 (exclusive), got {test_frac}")
    by_cat: dict[str, list[list[dict]]] = {}
    for g in _groups(records, near_pairs or []):
        members = [records[i] for i in g]
        by_cat.setdefault(members[0].get("metadata", {}).get("category", "none"), []).append(members)
    rng = random.Random(seed)
    train: list[dict] = []
    test: list[dict] = []
    for cat in sorted(by_cat):
        gs = by_cat[cat]
        rng.shuffle(gs)
        n_test = round(len(gs) * test_frac)
        if len(gs) >= 2:
            n_test = max(1, min(n_test, len(gs) - 1))
        for i, g in enumerate(gs):
            (test if i < n_test else train).extend(g)
    train.sort(key=lambda r: r["id"])
    test.sort(key=lambda r: r["id"])
    return train, test


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CONTENT_HASH = re.compile(r"[0-9a-f]{64}")


def check_name(name: object) -> str:
    """A dataset name names a folder: DatasetError unless it is a plain name."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise DatasetError(f"dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                           "letter or digit (it names a folder)")
    return name


def version_dir(datasets: str | os.PathLike, name: object, content_hash: object) -> Path:
    """``datasets/<name>/<hash12>`` for a (checked) name and a sha256 content hash."""
    check_name(name)
    if not isinstance(content_hash, str) or not CONTENT_HASH.fullmatch(content_hash):
        raise DatasetError(f"content_hash {content_hash!r}: not a sha256 (64 lowercase hex digits)")
    return Path(datasets) / name / content_hash[:12]


@dataclass
class DatasetVersion:
    name: str
    content_hash: str
    path: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"min": v[0], "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": v[-1],
            "mean": round(sum(v) / len(v), 1)}


def build_version(files: list[str | os.PathLike], out_root: str | os.PathLike, name: str, *,
                  test_frac: float = 0.1, seed: int = 0, strict: bool = True, max_tokens: int | None = None,
                  count_tokens=None, reasoning_target: float = 0.5, spot_check_frac: float = 0.15,
                  near_dup_threshold: float = NEAR_DUP_THRESHOLD) -> DatasetVersion:
    """Check ``files`` and write a dataset version under ``out_root/<name>/<hash12>/``.

    With ``strict`` any invalid record aborts with a DatasetError listing every problem, and nothing
    is written. Without it, invalid records go to quarantine.jsonl with their reasons; either way
    train + test + quarantine + duplicates removed = input records.
    """
    check_name(name)
    if isinstance(reasoning_target, bool) or not isinstance(reasoning_target, (int, float)) \
            or not 0 <= reasoning_target <= 1:
        raise DatasetError(f"reasoning_target {reasoning_target!r}: use a fraction in [0, 1]")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise DatasetError(f"max_tokens {max_tokens!r}: use a whole number of tokens, at least 1")
    if not 0.1 <= spot_check_frac <= 0.2:
        raise DatasetError(f"spot_check_frac {spot_check_frac}: use 0.1-0.2")
    records: list[Record] = []
    for f in files:
        records.extend(read_jsonl(f))
    if not records:
        raise DatasetError(f"{', '.join(map(str, files))}: no records")
    problems = check_records(records, max_tokens, count_tokens)
    if problems and strict:
        raise DatasetError(f"{len(problems)} problem(s) in the input; nothing was written", problems)
    good = [r.data for r in records if r.ok]
    quarantine = [{"file": r.file, "line": r.line, "raw": r.raw.rstrip("\n"),
                   "problems": [p.to_dict() for p in r.problems]} for r in records if not r.ok]
    kinds = {"dpo" if is_dpo(d) else "chat" for d in good}
    if len(kinds) > 1:
        raise DatasetError("the inputs mix chat and DPO records; curate them as separate datasets")
    seen: dict[str, str] = {}
    unique: list[dict] = []
    duplicates: list[dict] = []
    for d in good:
        k = conversation_key(d)
        if k in seen:
            duplicates.append({"id": d["id"], "duplicate_of": seen[k]})
        else:
            seen[k] = d["id"]
            unique.append(d)
    if len(unique) < 2:
        raise DatasetError(f"{len(unique)} valid record(s): at least 2 are needed to split train/test")
    near = near_duplicate_pairs(unique, near_dup_threshold)
    train, test = split(unique, test_frac, seed, near)
    if not test or not train:
        raise DatasetError(f"the split left {len(train)} train / {len(test)} test records "
                           f"({len(unique)} unique, test_frac {test_frac}); add data or change --test-frac")
    train_txt, test_txt = _dump(train), _dump(test)
    content_hash = hashlib.sha256(("train\n" + train_txt + "test\n" + test_txt).encode()).hexdigest()

    def counts(rs: list[dict]) -> dict:
        cats: dict[str, int] = {}
        for r in rs:
            c = r.get("metadata", {}).get("category", "none")
            cats[c] = cats.get(c, 0) + 1
        return dict(sorted(cats.items()))

    n_reason = sum(is_reasoning(r) for r in unique)
    frac = n_reason / len(unique)
    warnings = []
    if not is_dpo(unique[0]) and abs(frac - reasoning_target) > 0.15:
        warnings.append(f"reasoning/direct balance is {frac:.0%} reasoning, far from the requested "
                        f"{reasoning_target:.0%}: the model may lose (or overuse) its thinking mode")
    lengths = [count_tokens(r) if count_tokens else estimate_tokens(record_text(r)) for r in unique]
    rng = random.Random(seed + 1)
    n_spot = max(1, round(len(unique) * spot_check_frac))
    spot = sorted(rng.sample(unique, n_spot), key=lambda r: r["id"])
    manifest = {
        "schema_version": 1,
        "name": name,
        "kind": "dpo" if is_dpo(unique[0]) else "chat",
        "content_hash": content_hash,
        "seed": seed,
        "test_frac": test_frac,
        "counts": {"input": len(records), "train": len(train), "test": len(test),
                   "quarantine": len(quarantine), "duplicates_removed": len(duplicates),
                   "near_duplicate_pairs": len(near)},
        "categories": {"train": counts(train), "test": counts(test)},
        "reasoning": {"reasoning": n_reason, "direct": len(unique) - n_reason,
                      "reasoning_frac": round(frac, 4), "target": reasoning_target},
        "tokens": {"counted_with": "tokenizer" if count_tokens else "estimate (~4 characters a token)",
                   "percentiles": _percentiles(lengths), "max_tokens": max_tokens,
                   "would_truncate": sum(n > max_tokens for n in lengths) if max_tokens else None},
        "sources": [{"path": os.path.basename(str(f)), "sha256": sha256_file(f)} for f in files],
        "duplicates": duplicates,
        "near_duplicates": [{"a": unique[i]["id"], "b": unique[j]["id"], "jaccard": jac} for i, j, jac in near],
        "spot_check": {"count": n_spot, "frac": spot_check_frac, "file": "spot_check.jsonl"},
        "warnings": warnings,
        "files": {"train.jsonl": hashlib.sha256(train_txt.encode()).hexdigest(),
                  "test.jsonl": hashlib.sha256(test_txt.encode()).hexdigest()},
    }
    final = Path(out_root) / name / content_hash[:12]
    if final.exists():
        existing = load_manifest(final)
        if existing.get("content_hash") == content_hash:
            return DatasetVersion(name, content_hash, final, existing, warnings)
        raise DatasetError(f"{final} exists with a different content hash; refusing to overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{content_hash[:12]}.", dir=final.parent))
    try:
        (tmp / "train.jsonl").write_text(train_txt, encoding="utf-8")
        (tmp / "test.jsonl").write_text(test_txt, encoding="utf-8")
        (tmp / "quarantine.jsonl").write_text(_dump(quarantine), encoding="utf-8")
        (tmp / "spot_check.jsonl").write_text(_dump(spot), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetVersion(name, content_hash, final, manifest, warnings)


def load_manifest(version_dir: str | os.PathLike) -> dict:
    return json.loads((Path(version_dir) / "manifest.json").read_text())


def verify_version(version_dir: str | os.PathLike) -> dict:
    """Re-hash train/test and compare with the manifest; raise DatasetError on any mismatch."""
    vd = Path(version_dir)
    try:
        manifest = load_manifest(vd)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{vd / 'manifest.json'}: unreadable ({exc})") from exc
    train_txt = (vd / "train.jsonl").read_text(encoding="utf-8")
    test_txt = (vd / "test.jsonl").read_text(encoding="utf-8")
    h = hashlib.sha256(("train\n" + train_txt + "test\n" + test_txt).encode()).hexdigest()
    if h != manifest.get("content_hash"):
        raise DatasetError(f"{vd}: content hash {h[:12]} does not match the manifest's "
                           f"{str(manifest.get('content_hash'))[:12]}; the version was modified")
    return manifest


VERSION_FILES = ("train.jsonl", "test.jsonl", "manifest.json")


def version_files(version_dir: str | os.PathLike) -> dict[str, str]:
    """The files an executor needs of a version (they travel with a submission)."""
    return {n: (Path(version_dir) / n).read_text(encoding="utf-8") for n in VERSION_FILES}


def tokenizer_counter(folder: str | os.PathLike):
    """``record -> token count`` with a model folder's tokenizer (chat template when it has one)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise DatasetError("counting with a tokenizer needs transformers: pip install 'duet[executor]'") from exc
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except OSError as exc:
        raise DatasetError(f"{folder}: no tokenizer there ({exc})") from exc

    def count(d: dict) -> int:
        msgs = d["messages"] if "messages" in d else \
            d["prompt"] + max(d["chosen"], d["rejected"], key=lambda m: len(str(m)))
        if tok.chat_template:
            return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        return len(tok("\n".join(m["content"] for m in msgs))["input_ids"])

    return count


def load_split(version_dir: str | os.PathLike, which: str) -> list[dict]:
    path = Path(version_dir) / f"{which}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
