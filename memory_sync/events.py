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
    return ev


@dataclass
class Session:
    id: str
    path: Path

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def meta(self) -> dict:
        return json.loads((self.path / "session.json").read_text())

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


def read_events(path: str | os.PathLike) -> list[dict]:
    """Parse an events.jsonl; a malformed line raises EventError naming file and line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EventError(f"{p}:{n}: invalid JSON: {exc.msg}") from exc
        out.append(validate_event(ev, f"{p}:{n}"))
    return out


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
    path = Path(workspace) / "sessions" / sid
    if not (path / "session.json").exists():
        raise EventError(f"unknown session {sid!r} (no {path / 'session.json'})")
    return Session(sid, path)
