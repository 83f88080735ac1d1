"""What a session is, derived from its event log: status, turns, decisions, what is next, handoff.md.

Nothing here writes to an event log except through ``Session.append``; everything else is derived
from the events (and so from git), deterministically: the same events give byte-identical output on
any host. That is what lets ``handoff.md`` be rebuilt after every sync instead of merged.

Event payload conventions (kinds from memory_sync.log.KINDS):
- turn:      {"role": "user"|"assistant"|"system", "text": str}
- note:      {"text": str, "pinned": bool?}            (pinned notes always go into the context)
             {"hypothesis": {"id", "text", "confidence"}, "status"?}   (a hypothesis was raised)
- decision:  {"text": str, "why": str?}
- state:     {"status": "open"|"closed"} | {"next": str} | {"blocker": str} | {"resolved": str}
             (plus the architect's pipeline steps: {"step": ..., ...})
- run-event: {"run_id": str, "event": str, "state"?: str, ...}
- alert:     {"rule": str, "severity": str, "message": str, "run_id"?: str}
- handoff:   {"host": str, "to"?: str, "summary"?: str}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from infra.run_states import TERMINAL as TERMINAL_RUN_STATES
from memory_sync.log import EventError, Session, open_session, read_events, read_meta

ROLES = ("user", "assistant", "system")
HANDOFF = "handoff.md"


@dataclass
class View:
    """A session's state as its events say."""

    meta: dict
    events: list[dict]

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def status(self) -> str:
        status = "open"
        for e in self.events:
            if e["kind"] == "state" and e["payload"].get("status") in ("open", "closed"):
                status = e["payload"]["status"]
        return status

    def turns(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "turn"]

    def decisions(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "decision"]

    def pinned(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "note" and e["payload"].get("pinned")]

    def notes(self) -> list[dict]:
        return [e for e in self.events if e["kind"] == "note" and "text" in e["payload"]]

    def next_step(self) -> str | None:
        nxt = None
        for e in self.events:
            if e["kind"] == "state" and e["payload"].get("next"):
                nxt = e["payload"]["next"]
        return nxt

    def blockers(self) -> list[str]:
        open_: list[str] = []
        for e in self.events:
            p = e["payload"]
            if e["kind"] == "state" and p.get("blocker"):
                open_.append(p["blocker"])
            if e["kind"] == "state" and p.get("resolved") in open_:
                open_.remove(p["resolved"])
        return open_

    def hypotheses(self) -> list[dict]:
        """Hypotheses raised in this session and not yet promoted or rejected."""
        out: dict[str, dict] = {}
        for e in self.events:
            p = e["payload"]
            if e["kind"] != "note":
                continue
            h = p.get("hypothesis")
            if isinstance(h, dict) and h.get("id"):
                out[h["id"]] = h
            hid = p.get("id") if p.get("step") == "hypothesis" else p.get("hypothesis_id")
            if hid and p.get("status") in ("promoted", "rejected"):
                out.pop(hid, None)
        return list(out.values())

    def runs_in_flight(self) -> list[dict]:
        runs: dict[str, dict] = {}
        for e in self.events:
            p = e["payload"]
            rid = p.get("run_id")
            if not rid or e["kind"] not in ("run-event", "state"):
                continue
            r = runs.setdefault(rid, {"run_id": rid, "state": "submitted", "step": None})
            if p.get("event") == "state" or (e["kind"] == "state" and p.get("step") == "submitted"):
                r["state"] = p.get("state", r["state"])
            if p.get("step_count") is not None:
                r["step"] = p["step_count"]
            if p.get("event") in ("checkpoint",) and p.get("step") is not None:
                r["step"] = p["step"]
            if e["kind"] == "state" and p.get("step") == "recorded":
                r["state"] = p.get("status", "finished")
        return [r for r in runs.values() if r["state"] not in TERMINAL_RUN_STATES]


def view(workspace: str | os.PathLike, sid: str) -> View:
    s = open_session(workspace, sid)
    return View(s.meta(), s.events())


def resolve(workspace: str | os.PathLike, prefix: str) -> str:
    """A session id from a unique prefix (ids are long); EventError naming the choices otherwise."""
    from memory_sync.log import SESSION_ID

    if not isinstance(prefix, str) or not prefix.strip():
        raise EventError("give a session id (or a unique prefix of one); `duet session list` shows them")
    if not re.fullmatch(r"[0-9A-Za-z]{1,26}", prefix):
        raise EventError(f"session id {prefix!r}: only letters and digits (a ULID, 26 characters, or its prefix)")
    root = Path(workspace) / "sessions"
    ids = sorted(p.name for p in root.iterdir()
                 if SESSION_ID.fullmatch(p.name) and (p / "session.json").is_file()) if root.is_dir() else []
    if prefix in ids:
        return prefix
    hits = [i for i in ids if i.startswith(prefix.lower())]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise EventError(f"unknown session {prefix!r} in {root} (`duet session list` shows them)")
    raise EventError(f"session prefix {prefix!r} is ambiguous: {', '.join(hits[:5])}")


def list_sessions(workspace: str | os.PathLike) -> list[dict]:
    root = Path(workspace) / "sessions"
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not (p / "session.json").exists():
            continue
        v = View(read_meta(p / "session.json"), read_events(p / "events.jsonl"))
        last = v.events[-1]["time"] if v.events else v.meta["created"]
        out.append({"id": v.id, "title": v.meta["title"], "status": v.status, "host": v.meta["host"],
                    "tags": v.meta.get("tags", []), "events": len(v.events), "turns": len(v.turns()),
                    "last": last})
    return sorted(out, key=lambda r: r["last"], reverse=True)


MAX_TEXT_CHARS = 1_000_000  # per text field; DUET_MAX_TEXT_CHARS overrides
MAX_DEPTH = 32              # nesting of an event payload


def max_text_chars() -> int:
    raw = os.environ.get("DUET_MAX_TEXT_CHARS", "")
    try:
        return int(raw) if raw.strip() else MAX_TEXT_CHARS
    except ValueError as exc:
        raise EventError(f"DUET_MAX_TEXT_CHARS={raw!r}: use a whole number of characters") from exc


def check_payload(value: object, field: str = "payload", depth: int = 0) -> None:
    """EventError naming the field unless ``value`` is JSON that can be stored: strings of valid
    Unicode within the size limit, finite numbers, nesting within MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise EventError(f"{field}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        limit = max_text_chars()
        if len(value) > limit:
            raise EventError(f"{field}: {len(value):,} characters, above the limit of {limit:,} "
                             "(DUET_MAX_TEXT_CHARS raises it)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EventError(f"{field}: not valid Unicode (a lone surrogate at character {exc.start}; "
                             "was the text read with the wrong encoding?)") from exc
        if "\x00" in value:
            raise EventError(f"{field}: contains a NUL character (binary data is not a text)")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise EventError(f"{field}: {value} is not a finite number")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise EventError(f"{field}: key {k!r} is not a string")
            check_payload(k, f"{field} (a key)", depth + 1)
            check_payload(v, f"{field}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_payload(v, f"{field}[{i}]", depth + 1)
    elif value is not None and not isinstance(value, (bool, int)):
        raise EventError(f"{field}: {type(value).__name__} is not a JSON value")


def append_checked(session: Session, kind: str, payload: dict, *, redact_secrets: bool = False) -> dict:
    """Validate the payload for its kind and scan it for secrets, then append it. A bad payload
    raises EventError and a secret SecretFound (exit 2), both before anything is written. With
    ``redact_secrets`` (texts duet writes by itself, e.g. a run's error) a secret is replaced by a
    marker naming its kind instead."""
    from memory_sync.secret_scan import check_value, redact

    if not isinstance(payload, dict):
        raise EventError("an event payload must be an object")
    if kind == "turn":
        if payload.get("role") not in ROLES:
            raise EventError(f"turn role {payload.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(payload.get("text"), str) or not payload["text"].strip():
            raise EventError("a turn needs non-empty text")
    if kind in ("note", "decision") and "hypothesis" not in payload:
        if not isinstance(payload.get("text"), str) or not payload["text"].strip():
            raise EventError(f"a {kind} needs non-empty text")
    if kind == "decision" and "why" in payload and not (isinstance(payload["why"], str) and payload["why"].strip()):
        raise EventError("field 'why': give a non-empty reason, or leave --why out")
    check_payload(payload)
    workspace = session.path.parent.parent
    if redact_secrets:
        payload = redact(payload, workspace)
    else:
        check_value(payload, kind, workspace)
    return session.append(kind, payload)


def _line(text: str, width: int = 300) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= width else t[: width - 1] + "…"


def render_handoff(v: View, recent: int = 8) -> str:
    """handoff.md: derived from the events only, so every host renders the same bytes."""
    m = v.meta
    last = v.events[-1] if v.events else None
    out = [f"# Handoff: {m['title']}", "",
           f"- session `{v.id}`, started on {m['host']} at {m['created']}, status **{v.status}**",
           f"- {len(v.events)} events, {len(v.turns())} turns"
           + (f"; last event {last['time']} on {last['host']}" if last else ""),
           ""]
    if m.get("tags"):
        out.insert(4, f"- tags: {', '.join(m['tags'])}")
    out += ["## Current state", ""]
    states = [e for e in v.events if e["kind"] == "state"]
    out += [f"- {_line(json.dumps(states[-1]['payload'], sort_keys=True))}" if states else "- (no state recorded)", ""]
    out += ["## What is next", "", f"- {_line(v.next_step())}" if v.next_step() else "- (not recorded: `duet session log` a state with next)", ""]
    out += ["## Decisions", ""]
    out += [f"- {d['time'][:16]} {_line(d['payload']['text'])}" + (f" (why: {_line(d['payload']['why'], 200)})" if d["payload"].get("why") else "")
            for d in v.decisions()] or ["- (none)"]
    out += ["", "## Blockers", ""]
    out += [f"- {_line(b)}" for b in v.blockers()] or ["- (none)"]
    out += ["", "## Open hypotheses", ""]
    out += [f"- `{h['id']}` {_line(h.get('text', ''))} (confidence {h.get('confidence', '?')})" for h in v.hypotheses()] or ["- (none)"]
    out += ["", "## Runs in flight", ""]
    out += [f"- `{r['run_id']}` {r['state']}" + (f" at step {r['step']}" if r["step"] is not None else "") for r in v.runs_in_flight()] or ["- (none)"]
    out += ["", f"## Recent turns (last {recent})", ""]
    out += [f"- **{t['payload']['role']}** ({t['host']}, {t['time'][:16]}): {_line(t['payload']['text'])}" for t in v.turns()[-recent:]] or ["- (none)"]
    return "\n".join(out) + "\n"


def write_handoff(workspace: str | os.PathLike, sid: str) -> Path:
    v = view(workspace, sid)
    path = Path(workspace) / "sessions" / sid / HANDOFF
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_handoff(v), encoding="utf-8")
    os.replace(tmp, path)
    return path


def rebuild_derived(workspace: str | os.PathLike) -> list[Path]:
    """Rebuild every derived file that exists (handoff.md): after a pull they may be stale."""
    out = []
    root = Path(workspace) / "sessions"
    for p in sorted(root.glob(f"*/{HANDOFF}")) if root.exists() else []:
        new = render_handoff(view(workspace, p.parent.name))
        if p.read_text(encoding="utf-8") != new:
            p.write_text(new, encoding="utf-8")
            out.append(p)
    return out
