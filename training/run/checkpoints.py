"""Checkpoints that are either complete and valid, or ignored.

The trainer writes a checkpoint into ``<run>/checkpoints/.staging/checkpoint-<step>``; duet then
validates it (adapter or model weights load, trainer_state.json present and naming the step),
writes ``duet_checkpoint.json`` (size and sha256 of every file) and renames the folder into
``<run>/checkpoints/checkpoint-<step>``: the rename is the commit point. On resume a checkpoint
counts only if its manifest exists and every file still has its recorded size and hash, so a
partial write (killed mid-save) or a truncated file is skipped and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

MANIFEST = "duet_checkpoint.json"
STAGING = ".staging"
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder")
    return int(m.group(1))


def validate_fresh(ckpt: Path) -> dict:
    """Check a just-written checkpoint and return its manifest (raise CheckpointError if unusable)."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        raise CheckpointError(f"{ckpt}: trainer_state.json missing")
    st = json.loads(state.read_text())
    if st.get("global_step") != step_of(ckpt):
        raise CheckpointError(f"{ckpt}: trainer_state says step {st.get('global_step')}")
    weights = [w for w in WEIGHT_FILES if (ckpt / w).is_file()]
    if not weights:
        raise CheckpointError(f"{ckpt}: no weights ({' or '.join(WEIGHT_FILES)})")
    if "adapter_model.safetensors" in weights:
        from safetensors import safe_open

        with safe_open(str(ckpt / "adapter_model.safetensors"), framework="pt") as fh:
            if not list(fh.keys()):
                raise CheckpointError(f"{ckpt}: the adapter holds no tensors")
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(ckpt))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return {"step": st["global_step"], "files": files, "weights": weights}


def commit(staged: Path, final_root: Path) -> Path:
    """Validate a staged checkpoint, write its manifest, rename it into place."""
    manifest = validate_fresh(staged)
    tmp = staged / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, staged / MANIFEST)
    final = final_root / staged.name
    if final.exists():
        shutil.rmtree(final)
    os.rename(staged, final)
    return final


def is_valid(ckpt: Path) -> bool:
    """True when the manifest exists and every file matches its recorded size and hash."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        for rel, meta in manifest["files"].items():
            p = ckpt / rel
            if not p.is_file() or p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def listing(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (staging excluded)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name):
            out.append(p)
    return sorted(out, key=step_of)


def newest_valid(root: Path, skipped: list | None = None) -> Path | None:
    for p in reversed(listing(root)):
        if is_valid(p):
            return p
        if skipped is not None:
            skipped.append(str(p))
    return None


def rotate(root: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` valid checkpoints (invalid ones older than them too)."""
    valid = [p for p in listing(root) if is_valid(p)]
    removed = []
    if len(valid) > keep:
        cutoff = step_of(valid[-keep])
        for p in listing(root):
            if step_of(p) < cutoff:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed
