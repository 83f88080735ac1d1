"""Session event logs: ``sessions/<id>/events.jsonl``.

Invariants:
- events.jsonl is append-only: lines are never rewritten or deleted (a sync may add lines);
- each event has a globally unique, time-ordered ``id`` (sortable as a string), the ``host`` that
  wrote it, an ISO-8601 UTC ``time``, a ``kind`` from KINDS, a ``payload`` object and
  ``schema_version``;
- ``session.json`` holds the session's title, tags and host of origin; derived files
  (handoff.md) are rebuilt, never merged.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
KINDS = ("turn", "note", "decision", "state", "run-event", "alert", "handoff")
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sortable, no I L O U

_ULID = re.compile(f"[{_B32}]{{26}}")
SESSION_ID = re.compile(f"[{_B32.lower()}]{{26}}")
_lock = threading.Lock()
_last = {"ms": -1, "rand": 0}


class EventError(ValueError):
    """A malformed event or event line."""


def new_event_id() -> str:
    """A ULID: 48-bit millisecond time + 80 random bits, monotonic within this process."""
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last["ms"]:
            ms = _last["ms"]
            rand = _last["rand"] + 1
        else:
            rand = secrets.randbits(80)
        _last["ms"], _last["rand"] = ms, rand
    n = (ms << 80) | (rand & ((1 << 80) - 1))
    return "".join(_B32[(n >> (5 * i)) & 31] for i in reversed(range(26)))


def host_name() -> str:
    return os.environ.get("DUET_HOST_NAME") or socket.gethostname()


def make_event(kind: str, payload: dict, *, host: str | None = None) -> dict:
    if kind not in KINDS:
        raise EventError(f"event kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(payload, dict):
        raise EventError("event payload must be an object")
    return {
        "id": new_event_id(),
        "host": host or host_name(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "kind": kind,
        "payload": payload,
        "schema_version": SCHEMA_VERSION,
    }


def validate_event(ev: object, where: str = "event") -> dict:
    """Raise EventError naming the field unless ``ev`` is a well-formed event."""
    if not isinstance(ev, dict):
        raise EventError(f"{where}: expected an object")
    for key, typ in (("id", str), ("host", str), ("time", str), ("kind", str), ("payload", dict),
                     ("schema_version", int)):
        if not isinstance(ev.get(key), typ):
            raise EventError(f"{where}: field {key!r} missing or not a {typ.__name__}")
    if ev["kind"] not in KINDS:
        raise EventError(f"{where}: kind {ev['kind']!r} is not one of {', '.join(KINDS)}")
    if not _ULID.fullmatch(ev["id"]):
        raise EventError(f"{where}: id {ev['id']!r} is not a 26-character ULID")
    try:
        when = dt.datetime.fromisoformat(ev["time"])
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise EventError(f"{where}: time {ev['time'][:40]!r} is not an ISO-8601 time with a zone")
    if isinstance(ev["schema_version"], bool) or not 1 <= ev["schema_version"] <= SCHEMA_VERSION:
        raise EventError(f"{where}: schema_version {ev['schema_version']!r} is not one this duet reads (1..{SCHEMA_VERSION})")
    return ev


@dataclass
class Session:
    id: str
    path: Path

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def meta(self) -> dict:
        return read_meta(self.path / "session.json")

    def append(self, kind: str, payload: dict) -> dict:
        """Append one event (fsync'd) and return it."""
        ev = make_event(kind, payload)
        line = json.dumps(ev, ensure_ascii=False, sort_keys=True) + "\n"
        with open(self.events_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        return ev

    def events(self) -> list[dict]:
        return read_events(self.events_path)


def loads_strict(text: str) -> object:
    """json.loads that refuses NaN/Infinity (not JSON) and reports too-deep nesting as a ValueError."""
    def bad_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=bad_constant)
    except RecursionError as exc:
        raise ValueError("nested too deeply") from exc


META_FIELDS = (("id", str), ("title", str), ("tags", list), ("host", str), ("created", str), ("schema_version", int))


def validate_meta(meta: object, where: str) -> dict:
    """EventError naming the field unless ``meta`` is a well-formed session.json."""
    if not isinstance(meta, dict):
        raise EventError(f"{where}: expected an object")
    for key, typ in META_FIELDS:
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise EventError(f"{where}: field {key!r} missing or not a {typ.__name__}")
    if not SESSION_ID.fullmatch(meta["id"]):
        raise EventError(f"{where}: field 'id' {meta['id']!r} is not a session id (26 lowercase ULID characters)")
    if not all(isinstance(t, str) for t in meta["tags"]):
        raise EventError(f"{where}: field 'tags' must be a list of texts")
    return meta


def read_session_file(p: Path) -> str:
    """A session file's text, read inside its session folder (no symlink out of it, size-limited)."""
    from infra import safe_files

    try:
        return safe_files.read_bytes(p.parent, p.name).decode("utf-8")
    except safe_files.FileRefused as exc:
        raise EventError(str(exc)) from None


def read_meta(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        meta = loads_strict(read_session_file(p))
    except UnicodeDecodeError as exc:
        raise EventError(f"{p}: not UTF-8 (byte {exc.start})") from exc
    except ValueError as exc:
        raise EventError(f"{p}: invalid JSON: {exc}") from exc
    except OSError as exc:
        raise EventError(f"{p}: {exc.strerror}") from exc
    meta = validate_meta(meta, str(p))
    if meta["id"] != p.parent.name:
        raise EventError(f"{p}: field 'id' {meta['id']!r} is not the folder's name {p.parent.name!r}")
    return meta


def read_events(path: str | os.PathLike) -> list[dict]:
    """Parse an events.jsonl; a malformed line raises EventError naming file and line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    try:
        text = read_session_file(p)
    except UnicodeDecodeError as exc:
        raise EventError(f"{p}: not UTF-8 (byte {exc.start})") from exc
    for n, ev in json_lines(text, str(p), EventError):
        out.append(validate_event(ev, f"{p}:{n}"))
    return out


def json_lines(text: str, where: str, error: type[Exception]):
    """(line number, value) of each non-blank line of a JSONL text, parsed strictly (loads_strict);
    ``error`` naming where:line for a line that is not JSON."""
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, loads_strict(line)
        except ValueError as exc:
            raise error(f"{where}:{n}: invalid JSON: {exc}") from exc


def start_session(workspace: str | os.PathLike, title: str, tags: list[str] | None = None) -> Session:
    sid = new_event_id().lower()
    path = Path(workspace) / "sessions" / sid
    path.mkdir(parents=True)
    meta = {"id": sid, "title": title, "tags": tags or [], "status": "open", "host": host_name(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "schema_version": SCHEMA_VERSION}
    (path / "session.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (path / "events.jsonl").touch()
    return Session(sid, path)


def open_session(workspace: str | os.PathLike, sid: str) -> Session:
    if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
        raise EventError(f"session id {sid!r}: not a session id (26 lowercase ULID characters)")
    path = Path(workspace) / "sessions" / sid
    if not (path / "session.json").exists():
        raise EventError(f"unknown session {sid!r} (no {path / 'session.json'})")
    for p in (path, path / "session.json", path / "events.jsonl"):
        if p.is_symlink():
            raise EventError(f"{p}: a symlink; a session's files must be its own (refusing to write through it)")
    return Session(sid, path)
