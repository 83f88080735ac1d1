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
from dataclasses import dataclass, field
from pathlib import Path

from training.data.schema import DatasetError, is_dpo

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



def _groups(ids: list[str], near_pairs: list[tuple[int, int, float]], keys: list[str] | None = None) -> list[list[int]]:
    """Union-find over identical conversations (equal ``keys``; none: all differ) and near-duplicate
    pairs: each group is split as one. Groups in the order of their smallest id."""
    parent = list(range(len(ids)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first: dict[str, int] = {}
    for i, k in enumerate(keys or ()):
        if k in first:
            parent[find(i)] = find(first[k])
        else:
            first[k] = i
    for i, j, _ in near_pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(ids)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: min(ids[i] for i in g))


def split_indices(ids: list[str], categories: list[str], test_frac: float, seed: int,
                  near_pairs: list[tuple[int, int, float]] | None = None,
                  keys: list[str] | None = None) -> tuple[list[int], list[int]]:
    """``split`` on what it needs of each record (its id, category and conversation key): the train and
    test positions, each in id order."""
    if isinstance(test_frac, bool) or not isinstance(test_frac, (int, float)) or not 0.0 < test_frac < 1.0:
        raise DatasetError(f"test_frac must be between 0 and 1 (exclusive), got {test_frac}")
    by_cat: dict[str, list[list[int]]] = {}
    for g in _groups(ids, near_pairs or [], keys):
        by_cat.setdefault(categories[g[0]], []).append(g)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for cat in sorted(by_cat):
        gs = by_cat[cat]
        rng.shuffle(gs)
        n_test = round(len(gs) * test_frac)
        if len(gs) >= 2:
            n_test = max(1, min(n_test, len(gs) - 1))
        for i, g in enumerate(gs):
            (test if i < n_test else train).extend(g)
    train.sort(key=lambda i: ids[i])
    test.sort(key=lambda i: ids[i])
    return train, test


def category(d: dict) -> str:
    return d.get("metadata", {}).get("category", "none")


def split(records: list[dict], test_frac: float, seed: int,
          near_pairs: list[tuple[int, int, float]] | None = None) -> tuple[list[dict], list[dict]]:
    """Leakage-free split stratified by category.

    Identical and near-duplicate conversations form groups that land wholly in train or in test.
    Deterministic for the same records, seed and fraction.
    """
    train, test = split_indices([r["id"] for r in records], [category(r) for r in records], test_frac, seed, near_pairs,
                                [conversation_key(r) for r in records])
    return [records[i] for i in train], [records[i] for i in test]


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


def prompt_and_reference(record: dict) -> tuple[list[dict], str]:
    """A held-out record as a prompt and the answer it should get: a chat record's messages before its
    last assistant turn and that turn; a DPO record's prompt and its chosen answer."""
    if "chosen" in record:
        return record["prompt"], record["chosen"][-1]["content"]
    msgs = record["messages"]
    return (msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs), msgs[-1]["content"]


def load_split(version_dir: str | os.PathLike, which: str) -> list[dict]:
    """A version's split, read inside the version's folder (infra/safe_files.py)."""
    from infra import safe_files

    return safe_files.read_jsonl(version_dir, f"{which}.jsonl", safe_files.DATA_BYTES)
