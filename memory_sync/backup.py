"""`duet memory backup OUT.tar.gz` / `duet memory restore BUNDLE`.

A bundle holds ``sessions/**`` (event logs, session.json, derived files), ``cortex/<table>.jsonl``
and ``neocortex/<collection>.jsonl`` dumps, and ``manifest.json``: format, host, time, counts, and
the size and sha256 of every other member. ``manifest_sha256`` (printed by backup) identifies the
manifest itself; ``restore --expect SHA`` also checks it, which catches a bundle whose files *and*
manifest were rewritten together.

Restore checks everything before writing anything: member names (no absolute paths, no ``..``, only
regular files), every member listed with a matching sha256 and size, nothing listed missing; the
target workspace must have no sessions and the stores no rows, so a restore never mixes with live
data. After writing it recounts and compares with the manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path, PurePosixPath

from memory_sync.cortex import TABLES
from memory_sync.events import host_name, read_events
from memory_sync.neocortex import COLLECTIONS

FORMAT = "duet-backup/1"


class BackupError(ValueError):
    pass


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows).encode()


def workspace_counts(root: Path) -> dict:
    sess = sorted((root / "sessions").glob("*/session.json"))
    return {"sessions": len(sess), "events": sum(len(read_events(p.parent / "events.jsonl")) for p in sess)}


def store_counts(memory) -> dict:
    out: dict = {}
    c = memory.cortex() if memory else None
    n = memory.neocortex() if memory else None
    if c is not None:
        out["cortex"] = {t: c.count(t) for t in TABLES}
    if n is not None:
        out["neocortex"] = {t: n.count(t) for t in COLLECTIONS}
    return out


def backup(workspace: str | os.PathLike, out: str | os.PathLike, memory=None) -> dict:
    root = Path(workspace).resolve()
    members: dict[str, bytes] = {}
    for p in sorted((root / "sessions").rglob("*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            members[p.relative_to(root).as_posix()] = p.read_bytes()
    c = memory.cortex() if memory else None
    n = memory.neocortex() if memory else None
    if c is not None:
        for t in TABLES:
            members[f"cortex/{t}.jsonl"] = _jsonl(c.dump(t))
    if n is not None:
        for col in COLLECTIONS:
            members[f"neocortex/{col}.jsonl"] = _jsonl(n.dump(col))
    manifest = {"format": FORMAT, "host": host_name(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "workspace": root.name, "counts": {**workspace_counts(root), **store_counts(memory)},
                "files": {k: {"sha256": _sha(v), "bytes": len(v)} for k, v in sorted(members.items())}}
    mbytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name, data in [("manifest.json", mbytes), *sorted(members.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return {"path": str(out), "counts": manifest["counts"], "files": len(members), "manifest_sha256": _sha(mbytes),
            "bytes": out.stat().st_size}


def read_bundle(bundle: str | os.PathLike, expect_sha: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """Open and verify a bundle; BackupError naming what is wrong. Nothing is written."""
    try:
        tar = tarfile.open(bundle, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{bundle}: not a duet backup (tar.gz): {exc}") from exc
    members: dict[str, bytes] = {}
    with tar:
        for m in tar.getmembers():
            pp = PurePosixPath(m.name)
            if not m.isfile() or pp.is_absolute() or ".." in pp.parts:
                raise BackupError(f"{bundle}: refusing member {m.name!r} (only plain relative files are allowed)")
            if m.name in members:
                raise BackupError(f"{bundle}: member {m.name!r} appears twice")
            members[m.name] = tar.extractfile(m).read()
    if "manifest.json" not in members:
        raise BackupError(f"{bundle}: no manifest.json")
    mbytes = members.pop("manifest.json")
    if expect_sha and _sha(mbytes) != expect_sha:
        raise BackupError(f"{bundle}: manifest sha256 {_sha(mbytes)[:16]}… is not the expected {expect_sha[:16]}…")
    try:
        manifest = json.loads(mbytes)
    except ValueError as exc:
        raise BackupError(f"{bundle}: manifest.json is not JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{bundle}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    listed = manifest.get("files", {})
    for name, data in members.items():
        if name not in listed:
            raise BackupError(f"{bundle}: {name} is not in the manifest (tampered bundle)")
        if _sha(data) != listed[name]["sha256"] or len(data) != listed[name]["bytes"]:
            raise BackupError(f"{bundle}: {name} does not match its sha256 in the manifest (tampered or corrupt)")
    missing = sorted(set(listed) - set(members))
    if missing:
        raise BackupError(f"{bundle}: missing {', '.join(missing[:5])} listed in the manifest")
    for name in members:
        if name.startswith("sessions/") and name.endswith("events.jsonl"):
            _check_events(name, members[name])
    return manifest, members


def _check_events(name: str, data: bytes) -> None:
    from memory_sync.events import EventError, validate_event

    for n, line in enumerate(data.decode().splitlines(), start=1):
        if line.strip():
            try:
                validate_event(json.loads(line), f"{name}:{n}")
            except (ValueError, EventError) as exc:
                raise BackupError(f"bundle {exc}") from exc


def restore(bundle: str | os.PathLike, workspace: str | os.PathLike, memory=None, expect_sha: str | None = None) -> dict:
    manifest, members = read_bundle(bundle, expect_sha)
    from memory_sync.workspace import Workspace

    ws = Workspace(workspace)
    root = ws.root
    if (root / "sessions").exists() and any((root / "sessions").glob("*/session.json")):
        raise BackupError(f"{root} already has sessions; restore goes into an empty workspace")
    before = store_counts(memory)
    if any(v for group in before.values() for v in group.values()):
        raise BackupError(f"the stores are not empty ({before}); restore goes into empty stores")
    has_cortex = any(k.startswith("cortex/") for k in members)
    has_neo = any(k.startswith("neocortex/") for k in members)
    if (has_cortex and (memory is None or memory.cortex() is None)) or (has_neo and (memory is None or memory.neocortex() is None)):
        raise BackupError("the bundle has store dumps but no store is configured here (DUET_POSTGRES_URL / "
                          "DUET_MONGO_URL, or `duet up`)")
    ws.init()
    for name, data in members.items():
        if name.startswith("sessions/"):
            dest = root / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    if has_cortex:
        c = memory.cortex()
        for t in TABLES:  # sessions before events (foreign key)
            rows = [json.loads(x) for x in members.get(f"cortex/{t}.jsonl", b"").decode().splitlines() if x.strip()]
            c.load(t, rows)
    if has_neo:
        n = memory.neocortex()
        for col in COLLECTIONS:
            docs = [json.loads(x) for x in members.get(f"neocortex/{col}.jsonl", b"").decode().splitlines() if x.strip()]
            n.load(col, docs)
    sha = ws.commit(["sessions"], f"restore: {Path(bundle).name} ({manifest['counts'].get('events', 0)} events "
                                  f"from {manifest['host']} {manifest['created']})")
    counts = {**workspace_counts(root), **store_counts(memory)}
    want = manifest["counts"]
    if {k: counts.get(k) for k in want} != want:
        raise BackupError(f"restored counts {counts} differ from the bundle's {want}")
    return {"workspace": str(root), "counts": counts, "commit": sha, "from": {k: manifest[k] for k in ("host", "created")}}
