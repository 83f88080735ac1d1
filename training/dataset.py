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
     "messages": [{"role": "system|user|assistant", "content": "..."}, ...],
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

ROLES = ("system", "user", "assistant")
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


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read a JSONL file line by line; undecodable or unparsable lines become problems."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    records: list[Record] = []
    with open(path, "rb") as fh:
        for lineno, rawb in enumerate(fh, start=1):
            if not rawb.strip():
                continue
            try:
                raw = rawb.decode("utf-8")
            except UnicodeDecodeError as exc:
                raw = rawb.decode("utf-8", errors="replace")
                records.append(Record(str(path), lineno, None, raw, [Problem(
                    str(path), lineno, None, "<line>", f"not UTF-8 ({exc.reason} at byte {exc.start})")]))
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                records.append(Record(str(path), lineno, None, raw, [Problem(
                    str(path), lineno, None, "<line>", f"invalid JSON: {exc.msg} at column {exc.colno}")]))
                continue
            records.append(Record(str(path), lineno, data, raw))
    return records


def check_record(rec: Record, max_chars: int | None = None) -> list[Problem]:
    """Every problem of one parsed chat record (empty when valid)."""
    if rec.data is None:
        return list(rec.problems)
    f, ln, d = rec.file, rec.line, rec.data
    if not isinstance(d, dict):
        return [Problem(f, ln, None, "<record>", f"expected a JSON object, got {type(d).__name__}")]
    rid = rec.record_id
    out: list[Problem] = []

    def bad(fld: str, msg: str) -> None:
        out.append(Problem(f, ln, rid, fld, msg))

    if "id" not in d:
        bad("id", "missing (a unique string is required)")
    elif not isinstance(d["id"], str) or not d["id"].strip():
        bad("id", "must be a non-empty string")
    msgs = d.get("messages")
    if msgs is None:
        bad("messages", "missing (a list of {role, content} objects is required)")
    elif not isinstance(msgs, list) or not msgs:
        bad("messages", "must be a non-empty list")
    else:
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                bad(where, "must be an object with role and content")
                continue
            role = m.get("role")
            if role not in ROLES:
                bad(f"{where}.role", f"{role!r} is not one of {', '.join(ROLES)}")
            elif role == "system" and i != 0:
                bad(f"{where}.role", "a system message is allowed only first")
            content = m.get("content")
            if not isinstance(content, str):
                bad(f"{where}.content", "must be a string")
            elif not content.strip():
                bad(f"{where}.content", "is empty")
            elif content.count(THINK_OPEN) != content.count(THINK_CLOSE):
                bad(f"{where}.content", "unbalanced <think> tags")
        roles = [m.get("role") for m in msgs if isinstance(m, dict)]
        if roles and roles[-1] != "assistant":
            bad("messages", "the conversation must end with an assistant message")
        if "user" not in roles:
            bad("messages", "needs at least one user message")
        if max_chars is not None:
            n = sum(len(m.get("content", "")) for m in msgs if isinstance(m, dict)
                    and isinstance(m.get("content"), str))
            if n > max_chars:
                bad("messages", f"{n} characters, above the limit of {max_chars}")
    meta = d.get("metadata", {})
    if not isinstance(meta, dict):
        bad("metadata", "must be an object")
    elif "category" in meta and meta["category"] not in CATEGORIES:
        bad("metadata.category", f"{meta['category']!r} is not one of {', '.join(CATEGORIES)}")
    return out


def check_records(records: list[Record], max_chars: int | None = None) -> list[Problem]:
    """Check every record, including duplicate ids across all files; fills ``rec.problems``."""
    seen: dict[str, Record] = {}
    problems: list[Problem] = []
    for rec in records:
        rec.problems = check_record(rec, max_chars)
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
    """Identity of a conversation's content (ignores id and metadata): duplicates share it."""
    norm = [(m.get("role"), re.sub(r"\s+", " ", m.get("content", "")).strip().lower())
            for m in data.get("messages", [])]
    return hashlib.sha256(json.dumps(norm).encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dump(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def split(records: list[dict], test_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Leakage-free split stratified by category.

    Duplicate conversations (same content) are grouped, so a group lands wholly in train or test.
    Deterministic for a given input order and seed.
    """
    if not 0.0 < test_frac < 1.0:
        raise DatasetError(f"test_frac must be between 0 and 1 (exclusive), got {test_frac}")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(conversation_key(r), []).append(r)
    by_cat: dict[str, list[list[dict]]] = {}
    for key in sorted(groups):
        g = groups[key]
        by_cat.setdefault(g[0].get("metadata", {}).get("category", "none"), []).append(g)
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


@dataclass
class DatasetVersion:
    name: str
    content_hash: str
    path: Path
    manifest: dict


def build_version(files: list[str | os.PathLike], out_root: str | os.PathLike, name: str, *,
                  test_frac: float = 0.1, seed: int = 0, strict: bool = True) -> DatasetVersion:
    """Check ``files`` and write a dataset version under ``out_root/<name>/<hash>/``.

    With ``strict`` (the demo's and ``--strict``'s behaviour) any invalid record aborts with a
    DatasetError listing every problem, and nothing is written. Without it, invalid records go to
    quarantine.jsonl with their reasons.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise DatasetError(f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    records: list[Record] = []
    for f in files:
        records.extend(read_jsonl(f))
    if not records:
        raise DatasetError(f"{', '.join(map(str, files))}: no records")
    problems = check_records(records)
    if problems and strict:
        raise DatasetError(f"{len(problems)} problem(s) in the input; nothing was written", problems)
    good = [r.data for r in records if r.ok]
    quarantine = [{"file": r.file, "line": r.line, "raw": r.raw.rstrip("\n"),
                   "problems": [p.to_dict() for p in r.problems]} for r in records if not r.ok]
    # Exact duplicate conversations: keep the first, record the others in the manifest.
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
    train, test = split(unique, test_frac, seed)
    train_txt, test_txt = _dump(train), _dump(test)
    content_hash = hashlib.sha256(("train\n" + train_txt + "test\n" + test_txt).encode()).hexdigest()

    def counts(rs: list[dict]) -> dict:
        cats: dict[str, int] = {}
        for r in rs:
            c = r.get("metadata", {}).get("category", "none")
            cats[c] = cats.get(c, 0) + 1
        return dict(sorted(cats.items()))

    n_reason = sum(is_reasoning(r) for r in unique)
    manifest = {
        "schema_version": 1,
        "name": name,
        "content_hash": content_hash,
        "seed": seed,
        "test_frac": test_frac,
        "counts": {"input": len(records), "train": len(train), "test": len(test),
                   "quarantine": len(quarantine), "duplicates_removed": len(duplicates)},
        "categories": {"train": counts(train), "test": counts(test)},
        "reasoning": {"reasoning": n_reason, "direct": len(unique) - n_reason,
                      "reasoning_frac": round(n_reason / len(unique), 4)},
        "sources": [{"path": os.path.basename(str(f)), "sha256": sha256_file(f)} for f in files],
        "duplicates": duplicates,
        "files": {"train.jsonl": hashlib.sha256(train_txt.encode()).hexdigest(),
                  "test.jsonl": hashlib.sha256(test_txt.encode()).hexdigest()},
    }
    final = Path(out_root) / name / content_hash[:12]
    if final.exists():
        existing = load_manifest(final)
        if existing.get("content_hash") == content_hash:
            return DatasetVersion(name, content_hash, final, existing)
        raise DatasetError(f"{final} exists with a different content hash; refusing to overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{content_hash[:12]}.", dir=final.parent))
    try:
        (tmp / "train.jsonl").write_text(train_txt, encoding="utf-8")
        (tmp / "test.jsonl").write_text(test_txt, encoding="utf-8")
        (tmp / "quarantine.jsonl").write_text(_dump(quarantine), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DatasetVersion(name, content_hash, final, manifest)


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


def load_split(version_dir: str | os.PathLike, which: str) -> list[dict]:
    path = Path(version_dir) / f"{which}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
