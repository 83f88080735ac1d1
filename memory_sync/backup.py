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
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from memory_sync.cortex import TABLES
from memory_sync.log import SESSION_ID, host_name, json_lines, loads_strict, read_events
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
    """{store kind: {table: rows}} of every configured store."""
    return {s.kind: {name: s.count(name) for name in s.names} for s in (memory.stores() if memory else [])}


def backup(workspace: str | os.PathLike, out: str | os.PathLike, memory=None) -> dict:
    root = Path(workspace).resolve()
    members: dict[str, bytes] = {}
    for d in sorted((root / "sessions").iterdir()) if (root / "sessions").is_dir() else []:
        if not SESSION_ID.fullmatch(d.name) or not (d / "session.json").is_file():
            continue
        for fname in _SESSION_FILES:
            p = d / fname
            if p.is_symlink():
                raise BackupError(f"{p}: a symlink; a backup holds only the session's own files")
            if p.is_file():
                members[p.relative_to(root).as_posix()] = p.read_bytes()
    for store in memory.stores() if memory else []:
        for name in store.names:
            members[f"{store.kind}/{name}.jsonl"] = _jsonl(store.dump(name))
    manifest = {"format": FORMAT, "host": host_name(),
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "workspace": root.name, "counts": {**workspace_counts(root), **store_counts(memory)},
                "files": {k: {"sha256": _sha(v), "bytes": len(v)} for k, v in sorted(members.items())}}
    mbytes = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    out = Path(out)
    if out.exists() and not out.is_file():
        raise BackupError(f"{out}: not a file; give the path of the .tar.gz to write")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in [("manifest.json", mbytes), *sorted(members.items())]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "counts": manifest["counts"], "files": len(members), "manifest_sha256": _sha(mbytes),
            "bytes": out.stat().st_size}


MAX_BUNDLE_BYTES = 4 << 30  # unpacked; DUET_MAX_BUNDLE_BYTES overrides
_SESSION_FILES = ("session.json", "events.jsonl", "handoff.md")


def _member_kind(name: str) -> str | None:
    """What a bundle member is, from its name, or None when a bundle may not hold it."""
    parts = PurePosixPath(name).parts
    if name == "manifest.json":
        return "manifest"
    if len(parts) == 3 and parts[0] == "sessions" and SESSION_ID.fullmatch(parts[1]) and parts[2] in _SESSION_FILES:
        return parts[2]
    if len(parts) == 2 and parts[0] == "cortex" and parts[1] in {f"{t}.jsonl" for t in TABLES}:
        return "cortex"
    if len(parts) == 2 and parts[0] == "neocortex" and parts[1] in {f"{c}.jsonl" for c in COLLECTIONS}:
        return "neocortex"
    return None


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_manifest(manifest: object, bundle) -> dict:
    if not isinstance(manifest, dict):
        raise BackupError(f"{bundle}: manifest.json is not an object")
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{bundle}: manifest field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("host", "created", "workspace"):
        if not isinstance(manifest.get(key), str):
            raise BackupError(f"{bundle}: manifest field {key!r} missing or not a text")
    counts, files = manifest.get("counts"), manifest.get("files")
    if not isinstance(counts, dict) or not _is_count(counts.get("sessions")) or not _is_count(counts.get("events")):
        raise BackupError(f"{bundle}: manifest field 'counts' needs whole numbers 'sessions' and 'events'")
    for store, names in (("cortex", TABLES), ("neocortex", COLLECTIONS)):
        if store in counts:
            group = counts[store]
            if not isinstance(group, dict) or set(group) != set(names) or not all(_is_count(v) for v in group.values()):
                raise BackupError(f"{bundle}: manifest field 'counts.{store}' needs a whole number for each of "
                                  f"{', '.join(names)}")
    unknown = set(counts) - {"sessions", "events", "cortex", "neocortex"}
    if unknown:
        raise BackupError(f"{bundle}: manifest field 'counts' has unknown entries {sorted(unknown)}")
    if not isinstance(files, dict):
        raise BackupError(f"{bundle}: manifest field 'files' missing or not an object")
    for name, meta in files.items():
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]) or not _is_count(meta.get("bytes"))):
            raise BackupError(f"{bundle}: manifest field 'files.{name}' needs 'sha256' (64 hex digits) and 'bytes'")
    return manifest


def read_bundle(bundle: str | os.PathLike, expect_sha: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """Open and verify a bundle; BackupError naming what is wrong. Nothing is written.

    Verified: member names (only duet's own files, no links, no duplicates), the manifest's shape,
    every member listed with a matching sha256 and size and nothing listed missing, every file's
    schema (session.json, each event line, each store row), the manifest's counts against what the
    files hold, and that no member holds a secret (SecretFound)."""
    limit = int(os.environ.get("DUET_MAX_BUNDLE_BYTES") or MAX_BUNDLE_BYTES)
    members: dict[str, bytes] = {}
    try:
        p = Path(bundle)
        if not p.is_file():
            raise BackupError(f"{bundle}: no such file")
        with tarfile.open(p, "r:gz") as tar:
            total = 0
            for m in tar:
                pp = PurePosixPath(m.name)
                if not m.isfile() or pp.is_absolute() or ".." in pp.parts or _member_kind(m.name) is None:
                    raise BackupError(f"{bundle}: refusing member {m.name!r} (a bundle holds manifest.json, "
                                      "sessions/<id>/{session.json,events.jsonl,handoff.md}, cortex/<table>.jsonl "
                                      "and neocortex/<collection>.jsonl as plain files)")
                if m.name in members:
                    raise BackupError(f"{bundle}: member {m.name!r} appears twice")
                total += m.size
                if total > limit:
                    raise BackupError(f"{bundle}: more than {limit:,} bytes unpacked (DUET_MAX_BUNDLE_BYTES raises it)")
                fh = tar.extractfile(m)
                members[m.name] = fh.read() if fh is not None else b""
    except BackupError:
        raise
    except (OSError, EOFError, tarfile.TarError, zlib.error, ValueError) as exc:
        raise BackupError(f"{bundle}: not a whole duet backup (tar.gz): {exc}") from exc
    if "manifest.json" not in members:
        raise BackupError(f"{bundle}: no manifest.json")
    mbytes = members.pop("manifest.json")
    if expect_sha and _sha(mbytes) != expect_sha:
        raise BackupError(f"{bundle}: manifest sha256 {_sha(mbytes)[:16]}… is not the expected {expect_sha[:16]}…")
    try:
        manifest = _check_manifest(loads_strict(mbytes.decode("utf-8")), bundle)
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BackupError):
            raise
        raise BackupError(f"{bundle}: manifest.json is not JSON: {exc}") from exc
    listed = manifest["files"]
    for name, data in members.items():
        if name not in listed:
            raise BackupError(f"{bundle}: {name} is not in the manifest (tampered bundle)")
        if _sha(data) != listed[name]["sha256"] or len(data) != listed[name]["bytes"]:
            raise BackupError(f"{bundle}: {name} does not match its sha256 in the manifest (tampered or corrupt)")
    missing = sorted(set(listed) - set(members))
    if missing:
        raise BackupError(f"{bundle}: missing {', '.join(missing[:5])} listed in the manifest")
    actual = _check_members(members, bundle)
    want = manifest["counts"]
    got = {k: actual.get(k) for k in want}
    if got != want:
        raise BackupError(f"{bundle}: the manifest counts {want} but the files hold {got}")
    from memory_sync.secret_scan import SecretFound, Scanner

    sc = Scanner()
    found = [f for name, data in sorted(members.items()) for f in sc.scan_bytes(data, f"{Path(bundle).name}!{name}")]
    if found:
        raise SecretFound(found, action="refusing to restore (the bundle holds a secret)")
    return manifest, members


def _rows(name: str, data: bytes, bundle) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BackupError(f"{bundle}: {name}: not UTF-8 (byte {exc.start})") from exc
    out = []
    for n, row in json_lines(text, f"{bundle}: {name}", BackupError):
        if not isinstance(row, dict) or "id" not in row:
            raise BackupError(f"{bundle}: {name}:{n}: expected an object with an 'id'")
        out.append(row)
    return out


def _check_members(members: dict[str, bytes], bundle) -> dict:
    """Every member's schema; returns the counts the files hold."""
    from memory_sync.log import EventError, validate_event, validate_meta

    counts: dict = {"sessions": 0, "events": 0}
    sessions = {PurePosixPath(n).parts[1] for n in members if n.startswith("sessions/")}
    for sid in sorted(sessions):
        meta_name = f"sessions/{sid}/session.json"
        if meta_name not in members:
            raise BackupError(f"{bundle}: sessions/{sid}/ has no session.json")
        try:
            try:
                raw_meta = loads_strict(members[meta_name].decode("utf-8"))
            except ValueError as exc:
                raise EventError(f"{bundle}: {meta_name}: invalid JSON: {exc}") from exc
            meta = validate_meta(raw_meta, f"{bundle}: {meta_name}")
            if meta["id"] != sid:
                raise EventError(f"{bundle}: {meta_name}: field 'id' {meta['id']!r} is not the folder's name")
            ev_name = f"sessions/{sid}/events.jsonl"
            for n, ev in json_lines(members.get(ev_name, b"").decode("utf-8"), f"{bundle}: {ev_name}", EventError):
                validate_event(ev, f"{bundle}: {ev_name}:{n}")
                counts["events"] += 1
            members.get(f"sessions/{sid}/handoff.md", b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BackupError(f"{bundle}: sessions/{sid}: a file is not UTF-8 (byte {exc.start})") from exc
        except (ValueError, EventError) as exc:
            raise BackupError(str(exc) if str(exc).startswith(str(bundle)) else f"{bundle}: sessions/{sid}: {exc}") from exc
        counts["sessions"] += 1
    from memory_sync.cortex import COLUMNS

    if any(n.startswith("cortex/") for n in members):
        counts["cortex"] = {}
        for t in TABLES:
            rows = _rows(f"cortex/{t}.jsonl", members.get(f"cortex/{t}.jsonl", b""), bundle)
            for i, r in enumerate(rows, start=1):
                if not r.keys() <= COLUMNS[t]:
                    raise BackupError(f"{bundle}: cortex/{t}.jsonl:{i}: unknown column(s) "
                                      f"{sorted(set(r) - COLUMNS[t])}; a {t} row has {', '.join(sorted(COLUMNS[t]))}")
            counts["cortex"][t] = len(rows)
    if any(n.startswith("neocortex/") for n in members):
        counts["neocortex"] = {c: len(_rows(f"neocortex/{c}.jsonl", members.get(f"neocortex/{c}.jsonl", b""), bundle))
                               for c in COLLECTIONS}
    return counts


def restore(bundle: str | os.PathLike, workspace: str | os.PathLike, memory=None, expect_sha: str | None = None) -> dict:
    """Verify the whole bundle, check the target, then write: sessions staged in a temporary folder
    and moved into place, the cortex in one transaction, the neocortex, one commit. If a step fails
    after writing began, what this restore wrote is removed again (the workspace it created, the
    session folders, the store rows), so a refused or failed restore changes nothing.

    Long because a restore is one guarded sequence: validate all, write, verify, in that order."""
    import shutil
    import tempfile

    from memory_sync.workspace import NotAWorkspace, Workspace

    manifest, members = read_bundle(bundle, expect_sha)
    ws = Workspace(workspace)
    root = ws.root
    if root.exists() and not root.is_dir():
        raise NotAWorkspace(f"{root} is a file; restore goes into an empty or new workspace folder")
    if (root / "sessions").is_dir() and any((root / "sessions").glob("*/session.json")):
        raise BackupError(f"{root} already has sessions; restore goes into an empty workspace")
    stores = {s.kind: s for s in (memory.stores() if memory else [])}
    in_bundle = [k for k in ("cortex", "neocortex") if any(m.startswith(k + "/") for m in members)]
    if set(in_bundle) - set(stores):
        raise BackupError("the bundle has store dumps but no store is configured here (DUET_POSTGRES_URL / "
                          "DUET_MONGO_URL, or `duet up`)")
    before = store_counts(memory)
    if any(v for group in before.values() for v in group.values()):
        raise BackupError(f"the stores are not empty ({before}); restore goes into empty stores")
    existed = root.exists()
    entries_before = set(os.listdir(root)) if existed else set()
    kept = {n: (root / n).read_bytes() for n in (".gitignore", ".gitattributes") if (root / n).is_file()}
    staging = Path(tempfile.mkdtemp(prefix=".duet-restore-", dir=root.parent if root.parent.exists() else None))
    moved: list[Path] = []
    restored: list[tuple] = []  # (store, dumps) fully restored, to take back if a later step fails
    try:
        for name, data in members.items():
            if name.startswith("sessions/"):
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        ws.init()
        (root / "sessions").mkdir(exist_ok=True)
        for d in sorted((staging / "sessions").iterdir()) if (staging / "sessions").exists() else []:
            target = root / "sessions" / d.name
            os.rename(d, target)
            moved.append(target)
        for kind in in_bundle:  # each store all or nothing: the cortex in one transaction, the neocortex undoes itself
            store = stores[kind]
            dumps = {name: _rows(f"{kind}/{name}.jsonl", members.get(f"{kind}/{name}.jsonl", b""), bundle)
                     for name in store.names}
            try:
                store.restore(dumps)
            except BackupError:
                raise
            except Exception as exc:  # the store refused a row (a type, a reference): it kept nothing
                raise BackupError(f"{bundle}: the {kind} refused the dump ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]}); nothing was restored") from exc
            restored.append((store, dumps))
        counts = {**workspace_counts(root), **store_counts(memory)}
        want = manifest["counts"]
        if {k: counts.get(k) for k in want} != want:
            raise BackupError(f"restored counts {counts} differ from the bundle's {want}; nothing was kept")
        sha = ws.commit(["sessions"], f"restore: {Path(bundle).name} ({want['events']} events "
                                      f"from {manifest['host']} {manifest['created']})")
    except BaseException:
        for path in moved:
            shutil.rmtree(path, ignore_errors=True)
        for store, dumps in reversed(restored):
            store.undo_restore(dumps)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:  # what init added to a folder that was there
            for name in set(os.listdir(root)) - entries_before:
                target = root / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() and not target.is_symlink() \
                    else target.unlink(missing_ok=True)
            for name, data in kept.items():
                (root / name).write_bytes(data)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"workspace": str(root), "counts": counts, "commit": sha, "from": {k: manifest[k] for k in ("host", "created")}}
