"""Moving a run to another executor (`duet runs move`), the executor's side, with no Ray: what moves
(``bundle``), reading it in chunks, and on the receiving executor writing it into a private folder
(``runs/.incoming-<run>/``), checking every file against the bundle's sizes and SHA-256 and the
checkpoint against its own manifest, and only then renaming it into ``runs/<run>/``.

What moves: the run's spec, record, loss and event logs, its dataset files, and its newest valid
checkpoint; not older checkpoints, the staging folder, the lock, or outputs (adapter, merged model,
exports), which the receiving executor makes again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from training.run import checkpoints
from training.data.dataset import sha256_file

CHUNK = 4 * 2**20
SKIP_TOP = {".lock", "adapter", "merged", "exports", "checkpoints", "run.json.tmp"}


class MoveError(RuntimeError):
    pass


def bundle(rdir: Path) -> dict:
    """The files that move, each with its size and SHA-256, and the checkpoint the run resumes from."""
    ckpt = checkpoints.newest_valid(rdir / "checkpoints")
    if ckpt is None:
        raise MoveError(f"run {rdir.name} has no valid checkpoint to move (it moves once it has saved one)")
    files = []
    for p in sorted(rdir.rglob("*")):
        rel = p.relative_to(rdir)
        if not p.is_file() or p.is_symlink():
            continue
        if rel.parts[0] in SKIP_TOP and not (rel.parts[0] == "checkpoints" and len(rel.parts) > 2
                                             and rel.parts[1] == ckpt.name):
            continue
        files.append({"path": rel.as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return {"run_id": rdir.name, "checkpoint": ckpt.name, "files": files,
            "bytes": sum(f["bytes"] for f in files)}


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise MoveError(f"{rel!r} leads out of {root}")
    return p


def read_chunk(rdir: Path, manifest: dict, rel: str, offset: int, size: int) -> bytes:
    if rel not in {f["path"] for f in manifest["files"]}:
        raise MoveError(f"{rel} is not a file of run {rdir.name}'s move")
    with open(_inside(rdir, rel), "rb") as fh:
        fh.seek(offset)
        return fh.read(min(size, CHUNK))


def incoming(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / f".incoming-{run_id}"


def begin(runs_dir: Path, manifest: dict) -> Path:
    run_id = manifest["run_id"]
    here = runs_dir / run_id / "run.json"
    if (runs_dir / run_id / "spec.json").exists() and not (here.exists() and json.loads(here.read_text()).get("moved_to")):
        raise MoveError(f"run {run_id} already exists on this executor; refusing to overwrite it")
    tmp = incoming(runs_dir, run_id)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_chunk(runs_dir: Path, manifest: dict, rel: str, offset: int, data: bytes) -> None:
    if rel not in {f["path"] for f in manifest["files"]}:
        raise MoveError(f"{rel} is not a file of run {manifest['run_id']}'s move")
    p = _inside(incoming(runs_dir, manifest["run_id"]), rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "r+b" if p.exists() else "wb") as fh:
        fh.seek(offset)
        fh.write(data)


def finish(runs_dir: Path, manifest: dict, moved_from: str) -> Path:
    """Check every file (size, SHA-256) and the checkpoint's own manifest, mark the record as moved
    and resumable, and rename the folder into place; MoveError (and nothing in place) otherwise."""
    run_id = manifest["run_id"]
    tmp = incoming(runs_dir, run_id)
    try:
        for f in manifest["files"]:
            p = _inside(tmp, f["path"])
            if not p.is_file() or p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
                raise MoveError(f"run {run_id}: {f['path']} arrived damaged (size or SHA-256 differ); nothing moved")
        if not checkpoints.is_valid(tmp / "checkpoints" / manifest["checkpoint"]):
            raise MoveError(f"run {run_id}: checkpoint {manifest['checkpoint']} fails its manifest; nothing moved")
        rec = json.loads((tmp / "run.json").read_text())
        moves = rec.get("moves", []) + [{"from": moved_from, "checkpoint": manifest["checkpoint"], "at": time.time(),
                                         "bytes": manifest["bytes"]}]
        rec.update(status="queued", error=None, moves=moves)
        for key in ("moved_to", "model_path", "preflight"):  # the other host's; this one finds its own
            rec.pop(key, None)
        (tmp / "run.json").write_text(json.dumps(rec, indent=2, sort_keys=True, default=str) + "\n")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dest = runs_dir / run_id
    if dest.exists():  # a folder the run left here earlier (moved away before): keep it aside
        os.replace(dest, runs_dir / f".moved-away-{run_id}-{int(time.time())}")
    os.replace(tmp, dest)
    return dest
