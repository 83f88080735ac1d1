"""Curation: input files to a dataset version (``duet data curate``), in two passes so that memory stays
flat however large the inputs (benchmarks/curation.py measures a 200 MB export).

1. Read, check and dedupe a line at a time: each unique good record's canonical line goes to a scratch
   file (``Spill``), the quarantine to another; memory keeps each record's id, category, reasoning flag
   and token count.
2. Near-duplicates (training/data/near_dups.py: MinHash signatures, then exact Jaccard of candidates
   read back from the scratch file) and the leakage-free split (training/data/dataset.split_indices)
   on those fields.
3. The version's files copied line by line from the scratch file into a temp folder under
   ``<out_root>/<name>/``, hashed on the way, and renamed into place (training/data/dataset.py's
   invariants).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from training.data.dataset import DatasetVersion, category, check_name, conversation_key, load_manifest, \
    sha256_file, split_indices
from training.data.near_dups import NEAR_DUP_THRESHOLD, near_duplicate_pairs
from training.data.schema import DatasetError, checked, estimate_tokens, is_dpo, is_reasoning, iter_jsonl, record_text, \
    refuse_bad_lines


class Spill:
    """Records as canonical JSONL lines in a file, with their offsets: curation's two passes keep the
    offsets and a few fields a record in memory, never the records (a sequence of dicts to read)."""

    def __init__(self, path: Path):
        from array import array

        self.path = path
        self.fh = open(path, "w+b")
        self.offsets, self.sizes = array("q"), array("q")
        self.end = 0

    def add(self, line: bytes) -> int:
        self.fh.seek(self.end)
        self.fh.write(line)
        self.offsets.append(self.end)
        self.sizes.append(len(line))
        self.end += len(line)
        return len(self.offsets) - 1

    def line(self, i: int) -> bytes:
        self.fh.seek(self.offsets[i])
        return self.fh.read(self.sizes[i])

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        return json.loads(self.line(i))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        self.fh.close()


def canonical_line(d: dict) -> bytes:
    """A record as a version's files hold it: one line of sorted-key JSON."""
    return (json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


@dataclass
class _Pass:
    """What the first pass keeps: for each unique good record its id, category, reasoning flag and token
    count (its text is in ``unique``, a Spill), and the quarantine as lines in a Spill of its own."""
    unique: Spill
    quarantine: Spill
    ids: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    reasoning: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    problems: list = field(default_factory=list)
    kinds: set = field(default_factory=set)
    inputs: int = 0


def _records(files) -> Iterator:
    """Every file's records a line at a time; a file with lines that are not JSON objects is refused
    whole once it has been read (read_jsonl's rule)."""
    for f in files:
        bad: list = []
        yield from iter_jsonl(f, bad)
        refuse_bad_lines(bad)


def _first_pass(files, work: Path, strict: bool, max_tokens: int | None, count_tokens) -> _Pass:
    """Read, check and dedupe every record a line at a time."""
    out = _Pass(Spill(work / "unique.jsonl"), Spill(work / "quarantine.jsonl"))
    seen_keys: dict[str, str] = {}
    for rec in checked(_records(files), max_tokens, count_tokens):
        out.inputs += 1
        if rec.problems:
            out.problems.extend(rec.problems)
            if not strict:
                out.quarantine.add(canonical_line({"file": rec.file, "line": rec.line, "raw": rec.raw.rstrip("\n"),
                                                   "problems": [p.to_dict() for p in rec.problems]}))
            continue
        d = rec.data
        out.kinds.add("dpo" if is_dpo(d) else "chat")
        k = conversation_key(d)
        if k in seen_keys:
            out.duplicates.append({"id": d["id"], "duplicate_of": seen_keys[k]})
            continue
        seen_keys[k] = d["id"]
        out.unique.add(canonical_line(d))
        out.ids.append(d["id"])
        out.categories.append(category(d))
        out.reasoning.append(is_reasoning(d))
        out.tokens.append(count_tokens(d) if count_tokens else estimate_tokens(record_text(d)))
    return out


def build_version(files: list[str | os.PathLike], out_root: str | os.PathLike, name: str, *,
                  test_frac: float = 0.1, seed: int = 0, strict: bool = True, max_tokens: int | None = None,
                  count_tokens=None, reasoning_target: float = 0.5, spot_check_frac: float = 0.15,
                  near_dup_threshold: float = NEAR_DUP_THRESHOLD) -> DatasetVersion:
    """Check ``files`` and write a dataset version under ``out_root/<name>/<hash12>/``.

    With ``strict`` any invalid record aborts with a DatasetError listing every problem, and nothing
    is written. Without it, invalid records go to quarantine.jsonl with their reasons; either way
    train + test + quarantine + duplicates removed = input records.

    Two passes over the data, so memory stays flat however large the inputs: the first reads, checks
    and dedupes a line at a time into a scratch file (training/data/dataset.Spill); near-duplicates
    and the split work on the records' ids, categories and MinHash signatures; the second copies the
    records' lines into the version's files.
    """
    check_name(name)
    if isinstance(reasoning_target, bool) or not isinstance(reasoning_target, (int, float)) \
            or not 0 <= reasoning_target <= 1:
        raise DatasetError(f"reasoning_target {reasoning_target!r}: use a fraction in [0, 1]")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise DatasetError(f"max_tokens {max_tokens!r}: use a whole number of tokens, at least 1")
    if not 0.1 <= spot_check_frac <= 0.2:
        raise DatasetError(f"spot_check_frac {spot_check_frac}: use 0.1-0.2")
    work = Path(tempfile.mkdtemp(prefix="duet-curate-"))
    first = None
    try:
        first = _first_pass(files, work, strict, max_tokens, count_tokens)
        if not first.inputs:
            raise DatasetError(f"{', '.join(map(str, files))}: no records")
        if first.problems and strict:
            raise DatasetError(f"{len(first.problems)} problem(s) in the input; nothing was written", first.problems)
        if len(first.kinds) > 1:
            raise DatasetError("the inputs mix chat and DPO records; curate them as separate datasets")
        if len(first.ids) < 2:
            raise DatasetError(f"{len(first.ids)} valid record(s): at least 2 are needed to split train/test")
        near = near_duplicate_pairs(first.unique, near_dup_threshold)
        train, test = split_indices(first.ids, first.categories, test_frac, seed, near)
        if not test or not train:
            raise DatasetError(f"the split left {len(train)} train / {len(test)} test records "
                               f"({len(first.ids)} unique, test_frac {test_frac}); add data or change --test-frac")
        out_dir = Path(out_root) / name
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".curating.", dir=out_dir))
        try:
            return _write_version(tmp, out_dir, name, files, first, train, test, near, seed=seed, test_frac=test_frac,
                                  max_tokens=max_tokens, count_tokens=count_tokens, reasoning_target=reasoning_target,
                                  spot_check_frac=spot_check_frac)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # renamed into place, or not needed
    finally:
        if first is not None:
            first.unique.close()
            first.quarantine.close()
        shutil.rmtree(work, ignore_errors=True)


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> int:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"min": v[0], "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": v[-1],
            "mean": round(sum(v) / len(v), 1)}


def _copy(path: Path, spill: Spill, positions, *hashes) -> str:
    """Write the spill's lines at ``positions`` into ``path`` a line at a time, feeding each line's
    bytes to ``hashes``; returns the file's own SHA-256."""
    own = hashlib.sha256()
    with open(path, "wb") as fh:
        for i in positions:
            b = spill.line(i)
            fh.write(b)
            own.update(b)
            for h in hashes:
                h.update(b)
    return own.hexdigest()


def _write_version(tmp: Path, out_dir: Path, name: str, files, first: _Pass, train: list[int], test: list[int], near,
                   *, seed, test_frac, max_tokens, count_tokens, reasoning_target, spot_check_frac) -> DatasetVersion:
    """The version's files, streamed into ``tmp`` (the content hash: SHA-256 of "train\n", train.jsonl,
    "test\n", test.jsonl), then renamed to ``out_dir/<hash12>`` in one step."""
    unique, ids = first.unique, first.ids
    content = hashlib.sha256(b"train\n")
    train_sha = _copy(tmp / "train.jsonl", unique, train, content)
    content.update(b"test\n")
    test_sha = _copy(tmp / "test.jsonl", unique, test, content)
    content_hash = content.hexdigest()

    def counts(positions: list[int]) -> dict:
        cats: dict[str, int] = {}
        for i in positions:
            cats[first.categories[i]] = cats.get(first.categories[i], 0) + 1
        return dict(sorted(cats.items()))

    n = len(ids)
    n_reason = sum(first.reasoning)
    frac = n_reason / n
    (kind,) = first.kinds
    warnings = []
    if kind == "chat" and abs(frac - reasoning_target) > 0.15:
        warnings.append(f"reasoning/direct balance is {frac:.0%} reasoning, far from the requested "
                        f"{reasoning_target:.0%}: the model may lose (or overuse) its thinking mode")
    rng = random.Random(seed + 1)
    n_spot = max(1, round(n * spot_check_frac))
    spot = sorted(rng.sample(range(n), n_spot), key=lambda i: ids[i])  # the positions random.sample(records) takes
    manifest = {
        "schema_version": 1,
        "name": name,
        "kind": kind,
        "content_hash": content_hash,
        "seed": seed,
        "test_frac": test_frac,
        "counts": {"input": first.inputs, "train": len(train), "test": len(test),
                   "quarantine": len(first.quarantine), "duplicates_removed": len(first.duplicates),
                   "near_duplicate_pairs": len(near)},
        "categories": {"train": counts(train), "test": counts(test)},
        "reasoning": {"reasoning": n_reason, "direct": n - n_reason,
                      "reasoning_frac": round(frac, 4), "target": reasoning_target},
        "tokens": {"counted_with": "tokenizer" if count_tokens else "estimate (~4 characters a token)",
                   "percentiles": percentiles(first.tokens), "max_tokens": max_tokens,
                   "would_truncate": sum(t > max_tokens for t in first.tokens) if max_tokens else None},
        "sources": [{"path": os.path.basename(str(f)), "sha256": sha256_file(f)} for f in files],
        "duplicates": first.duplicates,
        "near_duplicates": [{"a": ids[i], "b": ids[j], "jaccard": jac} for i, j, jac in near],
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
    _copy(tmp / "quarantine.jsonl", first.quarantine, range(len(first.quarantine)))
    _copy(tmp / "spot_check.jsonl", unique, spot)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.rename(tmp, final)
    return DatasetVersion(name, content_hash, final, manifest, warnings)
