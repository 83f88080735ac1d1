"""Dataset versions as people look at them, shared by ``duet data versions | show | diff`` and the
dashboard's Datasets pages: the workspace's versions, one version's overview (counts, a token-length
histogram, category and reasoning balance, the quarantine with its reasons, spot-check records), and
what changed between two versions.

Read-only: nothing here writes to a version (they are immutable, see training/data/dataset.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from training.data.dataset import check_name, conversation_key, load_manifest, load_split
from training.data.schema import DatasetError, estimate_tokens, is_reasoning, record_text

RAW_CHARS = 2000       # a quarantined line is shown up to this many characters
LIST_LIMIT = 200       # ids listed per kind of change in a diff (the counts are whole)


def list_versions(workspace: str | os.PathLike) -> list[dict]:
    """Every version under ``<workspace>/datasets``, newest first within a name."""
    root = Path(workspace) / "datasets"
    out = []
    for mf in sorted(root.glob("*/*/manifest.json")) if root.is_dir() else []:
        if mf.parent.is_symlink() or mf.parent.parent.is_symlink():
            continue
        try:
            m = load_manifest(mf.parent)
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or not str(m.get("content_hash", "")).startswith(mf.parent.name):
            continue
        out.append({"name": mf.parent.parent.name, "hash": mf.parent.name, "content_hash": m["content_hash"],
                    "kind": m.get("kind"), "counts": m.get("counts", {}), "warnings": m.get("warnings", []),
                    "created": mf.stat().st_mtime, "path": str(mf.parent)})
    return sorted(out, key=lambda v: (v["name"], -v["created"]))


def find_version(workspace: str | os.PathLike, name: str, ref: str | None = None) -> Path:
    """The folder of version ``name@ref`` (``ref``: a hash prefix; None: the newest). DatasetError
    naming the versions there when it is unknown or ambiguous."""
    check_name(name)
    mine = [v for v in list_versions(workspace) if v["name"] == name]
    if not mine:
        raise DatasetError(f"no dataset {name!r} in {Path(workspace) / 'datasets'}")
    if ref is None:
        return Path(mine[0]["path"])
    if not isinstance(ref, str) or not ref.isalnum():
        raise DatasetError(f"version {ref!r}: give a hash prefix, e.g. {mine[0]['hash'][:8]}")
    hits = [v for v in mine if v["content_hash"].startswith(ref.lower())]
    if len(hits) != 1:
        what = "is ambiguous" if hits else "is unknown"
        raise DatasetError(f"version {name}@{ref} {what}; versions: {', '.join(v['hash'] for v in mine)}")
    return Path(hits[0]["path"])


def resolve(workspace: str | os.PathLike, spec: str) -> Path:
    """``NAME`` (the newest version) or ``NAME@HASH_PREFIX`` -> the version's folder."""
    name, _, ref = str(spec).partition("@")
    return find_version(workspace, name, ref or None)


def histogram(values: list[int], bins: int = 20) -> dict:
    """Equal-width bins over [min, max]: {"edges": bins + 1 numbers, "counts": bins numbers}."""
    if not values:
        return {"edges": [], "counts": []}
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    edges = [lo + i * width for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - lo) // width)] += 1
    while len(counts) > 1 and counts[-1] == 0:
        counts.pop()
        edges.pop()
    return {"edges": edges, "counts": counts}


def _jsonl(path: Path) -> list[dict]:
    from infra import safe_files

    try:
        return [x for x in safe_files.read_jsonl(path.parent, path.name) if isinstance(x, dict)]
    except FileNotFoundError:
        return []


def overview(version_dir: str | os.PathLike, spot_limit: int = 20) -> dict:
    """One version for people: the manifest, token lengths (histogram and percentiles), categories per
    split, the reasoning balance, every quarantined record with its problems, and spot-check records."""
    vd = Path(version_dir)
    m = load_manifest(vd)
    records = load_split(vd, "train") + load_split(vd, "test")
    lengths = [estimate_tokens(record_text(r)) for r in records]
    quarantine = [{"file": q.get("file"), "line": q.get("line"), "problems": q.get("problems", []),
                   "raw": str(q.get("raw", ""))[:RAW_CHARS], "cut": len(str(q.get("raw", ""))) > RAW_CHARS}
                  for q in _jsonl(vd / "quarantine.jsonl")]
    return {"name": vd.parent.name, "hash": vd.name, "manifest": m,
            "tokens": {"histogram": histogram(lengths), "counted_with": "estimate (~4 characters a token)",
                       "manifest_counted_with": (m.get("tokens") or {}).get("counted_with"),
                       "percentiles": (m.get("tokens") or {}).get("percentiles")},
            "categories": m.get("categories", {}),
            "reasoning": m.get("reasoning") or {"reasoning": sum(map(is_reasoning, records))},
            "quarantine": quarantine, "spot_check": _jsonl(vd / "spot_check.jsonl")[:spot_limit]}


def _by_id(vd: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for which in ("train", "test"):
        for r in load_split(vd, which):
            out[r["id"]] = (which, conversation_key(r))
    return out


def diff(a_dir: str | os.PathLike, b_dir: str | os.PathLike) -> dict:
    """What changed from version A to version B, by record id: added, removed, changed (same id, other
    content), moved between train and test; counts whole, ids listed up to LIST_LIMIT a kind."""
    a, b = _by_id(Path(a_dir)), _by_id(Path(b_dir))
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    both = sorted(set(a) & set(b))
    changed = [i for i in both if a[i][1] != b[i][1]]
    moved = [{"id": i, "from": a[i][0], "to": b[i][0]} for i in both if a[i][0] != b[i][0]]
    ma, mb = load_manifest(a_dir), load_manifest(b_dir)
    return {"a": {"path": str(a_dir), "content_hash": ma["content_hash"], "counts": ma.get("counts", {})},
            "b": {"path": str(b_dir), "content_hash": mb["content_hash"], "counts": mb.get("counts", {})},
            "counts": {"added": len(added), "removed": len(removed), "changed": len(changed), "moved": len(moved),
                       "unchanged": len(both) - len(changed)},
            "added": added[:LIST_LIMIT], "removed": removed[:LIST_LIMIT], "changed": changed[:LIST_LIMIT],
            "moved": moved[:LIST_LIMIT]}
