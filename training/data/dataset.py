"""Chat datasets: read, check, split and version.

A dataset version lives in ``datasets/<name>/<hash>/`` of the workspace:

- ``train.jsonl``, ``test.jsonl``: canonical chat records (one JSON object a line);
- ``quarantine.jsonl``: records that failed the check, each with its problems (never dropped);
- ``manifest.json``: counts, per-category counts, reasoning/direct balance, sources with their
  sha256, and ``content_hash``, the sha256 over train + test, which names the folder.

Invariants: a version folder is written to a temp folder and renamed into place, so it is either
complete or absent; the same inputs and seed give the same hash; no record id (nor an identical
conversation) appears in both train and test.

The record schema and its checks are in training/data/schema.py.
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

from training.data.schema import DatasetError, Record, check_records, estimate_tokens, is_dpo, is_reasoning, read_jsonl, \
    record_text

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


from training.data.near_dups import NEAR_DUP_THRESHOLD, near_duplicate_pairs  # noqa: E402  (re-exported)


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
    
    Long because writing a version is one all-or-nothing step: check, dedupe, split, count and rename into place.
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
    for r in records:  # a good record's line is its data now: memory holds each record once
        r.raw = ""
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
    out_dir = Path(out_root) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".curating.", dir=out_dir))
    try:
        return _write_version(tmp, out_dir, name, files, records, unique, train, test, duplicates, quarantine, near,
                              seed=seed, test_frac=test_frac, max_tokens=max_tokens, count_tokens=count_tokens,
                              reasoning_target=reasoning_target, spot_check_frac=spot_check_frac)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # renamed into place, or not needed


def _stream(path: Path, rows: list[dict], *hashes) -> str:
    """Write ``rows`` as JSONL a line at a time (never the whole text in memory), feeding each line's
    bytes to ``hashes``; returns the file's own SHA-256."""
    own = hashlib.sha256()
    with open(path, "wb") as fh:
        for r in rows:
            b = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            fh.write(b)
            own.update(b)
            for h in hashes:
                h.update(b)
    return own.hexdigest()


def _write_version(tmp: Path, out_dir: Path, name: str, files, records, unique, train, test, duplicates, quarantine,
                   near, *, seed, test_frac, max_tokens, count_tokens, reasoning_target,
                   spot_check_frac) -> DatasetVersion:
    """The version's files, streamed into ``tmp`` (the content hash: SHA-256 of "train\n", train.jsonl,
    "test\n", test.jsonl), then renamed to ``out_dir/<hash12>`` in one step."""
    content = hashlib.sha256(b"train\n")
    train_sha = _stream(tmp / "train.jsonl", train, content)
    content.update(b"test\n")
    test_sha = _stream(tmp / "test.jsonl", test, content)
    content_hash = content.hexdigest()

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
        "files": {"train.jsonl": train_sha, "test.jsonl": test_sha},
    }
    final = out_dir / content_hash[:12]
    if final.exists():
        existing = load_manifest(final)
        if existing.get("content_hash") == content_hash:
            return DatasetVersion(name, content_hash, final, existing, warnings)
        raise DatasetError(f"{final} exists with a different content hash; refusing to overwrite")
    _stream(tmp / "quarantine.jsonl", quarantine)
    _stream(tmp / "spot_check.jsonl", spot)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.rename(tmp, final)
    return DatasetVersion(name, content_hash, final, manifest, warnings)


def load_manifest(version_dir: str | os.PathLike) -> dict:
    from infra import safe_files

    return safe_files.read_json(version_dir, "manifest.json")


def verify_version(version_dir: str | os.PathLike) -> dict:
    """Re-hash train/test and compare with the manifest; raise DatasetError on any mismatch."""
    vd = Path(version_dir)
    try:
        manifest = load_manifest(vd)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{vd / 'manifest.json'}: unreadable ({exc})") from exc
    from infra import safe_files

    try:
        train_txt = safe_files.read_bytes(vd, "train.jsonl", safe_files.DATA_BYTES).decode("utf-8")
        test_txt = safe_files.read_bytes(vd, "test.jsonl", safe_files.DATA_BYTES).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{vd}: {exc}") from exc
    h = hashlib.sha256(("train\n" + train_txt + "test\n" + test_txt).encode()).hexdigest()
    if h != manifest.get("content_hash"):
        raise DatasetError(f"{vd}: content hash {h[:12]} does not match the manifest's "
                           f"{str(manifest.get('content_hash'))[:12]}; the version was modified")
    return manifest


VERSION_FILES = ("train.jsonl", "test.jsonl", "manifest.json")


def version_files(version_dir: str | os.PathLike) -> dict[str, str]:
    """The files an executor needs of a version (they travel with a submission)."""
    return {n: (Path(version_dir) / n).read_text(encoding="utf-8") for n in VERSION_FILES}


def takes_system(tok) -> bool:
    """Whether the tokenizer's chat template renders a system message (Gemma 2's raises on one)."""
    if not getattr(tok, "chat_template", None):
        return True
    cached = getattr(tok, "_duet_takes_system", None)
    if cached is None:
        try:
            tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                    tokenize=False, add_generation_prompt=True)
            cached = True
        except Exception:  # noqa: BLE001 - the template's raise_exception
            cached = False
        tok._duet_takes_system = cached
    return cached


def for_template(tok, messages: list[dict]) -> list[dict]:
    """A conversation as the tokenizer's chat template takes it: where the template has no system role,
    the system message opens the first user turn ("system\n\nuser"), as Gemma 3's own template does."""
    if not messages or messages[0].get("role") != "system" or takes_system(tok):
        return messages
    rest = list(messages[1:])
    if rest and rest[0].get("role") == "user":
        rest[0] = {**rest[0], "content": f"{messages[0]['content']}\n\n{rest[0]['content']}"}
        return rest
    return [{"role": "user", "content": messages[0]["content"]}] + rest


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
        msgs = for_template(tok, d["messages"] if "messages" in d else
                            d["prompt"] + max(d["chosen"], d["rejected"], key=lambda m: len(str(m))))
        if tok.chat_template:
            return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
        return len(tok("\n".join(m["content"] for m in msgs))["input_ids"])

    return count


def load_split(version_dir: str | os.PathLike, which: str) -> list[dict]:
    """A version's split, read inside the version's folder (infra/safe_files.py)."""
    from infra import safe_files

    return safe_files.read_jsonl(version_dir, f"{which}.jsonl", safe_files.DATA_BYTES)
