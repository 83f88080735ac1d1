"""Memory facade: session event logs in git, mirrored to the cortex (Postgres) and neocortex (Mongo).

Invariants:
- the event log in the workspace is the source of truth; store writes are idempotent upserts by
  event id, so replaying them is always safe;
- when a store is unreachable its writes go to a durable outbox (``.duet/outbox.jsonl``) and are
  flushed by the next successful write or ``flush()``; nothing blocks and nothing is lost;
- hypotheses are never deleted: promotion writes a cortex fact with provenance and marks the
  hypothesis ``promoted``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memory_sync.log import Session, open_session, start_session

OUTBOX = "outbox.jsonl"


class Memory:
    def __init__(self, workspace: str | os.PathLike, postgres_url: str | None, mongo_url: str | None,
                 *, redact_secrets: bool = False):
        """``redact_secrets``: for texts duet writes by itself (the architect's pipeline events), a
        secret is replaced by a marker; otherwise (what a person types) it is refused, SecretFound."""
        self.root = Path(workspace)
        self.postgres_url = postgres_url
        self.mongo_url = mongo_url
        self.redact_secrets = redact_secrets
        self._cortex = None
        self._neocortex = None
        self.outbox = self.root / ".duet" / OUTBOX

    # -- stores -------------------------------------------------------------------------------------

    def cortex(self):
        if self._cortex is None and self.postgres_url:
            from memory_sync.cortex import Cortex

            c = Cortex(self.postgres_url)
            c.migrate()
            self._cortex = c
        return self._cortex

    def neocortex(self):
        if self._neocortex is None and self.mongo_url:
            from memory_sync.neocortex import Neocortex

            n = Neocortex(self.mongo_url)
            n.migrate()
            self._neocortex = n
        return self._neocortex

    def stores(self) -> list:
        """The configured stores (``Store``s), connected and migrated; the unconfigured left out."""
        return [s for s in (self.cortex(), self.neocortex()) if s is not None]

    def close(self) -> None:
        for s in (self._cortex, self._neocortex):
            if s is not None:
                s.close()
        self._cortex = self._neocortex = None

    def _apply(self, op: dict) -> None:
        kind = op["op"]
        if kind == "events":
            c, n = self.cortex(), self.neocortex()
            if c is not None:
                c.upsert_session(op["session"])
                c.upsert_events(op["session"]["id"], op["events"])
            if n is not None:
                n.upsert_events(op["session"]["id"], op["events"])
        elif kind == "run":
            c = self.cortex()
            if c is not None:
                c.upsert_run(op["record"])
        elif kind == "fact":
            c = self.cortex()
            if c is not None:
                c.add_fact(op["text"], op["provenance"], kind=op.get("kind", "pattern"),
                           data=op.get("data"), dedup_key=op.get("dedup_key"))
        else:
            raise ValueError(f"unknown outbox op {kind!r}")

    def write(self, op: dict) -> bool:
        """Apply a store write, or queue it in the outbox when a store is unreachable."""
        self.flush()
        try:
            self._apply(op)
            return True
        except Exception:  # store down: keep the write, never block the user
            self._reset()
            self.outbox.parent.mkdir(parents=True, exist_ok=True)
            with open(self.outbox, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(op, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return False

    def _reset(self) -> None:
        for s in (self._cortex, self._neocortex):
            try:
                if s is not None:
                    s.close()
            except Exception:
                pass
        self._cortex = self._neocortex = None

    def flush(self) -> int:
        """Replay queued writes in order; returns how many were applied."""
        if not self.outbox.exists() or self.outbox.stat().st_size == 0:
            return 0
        ops = [json.loads(line) for line in self.outbox.read_text(encoding="utf-8").splitlines() if line.strip()]
        done = 0
        try:
            for op in ops:
                self._apply(op)
                done += 1
        except Exception:
            self._reset()
        rest = ops[done:]
        tmp = self.outbox.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(o, default=str) + "\n" for o in rest), encoding="utf-8")
        os.replace(tmp, self.outbox)
        return done

    def pending(self) -> int:
        if not self.outbox.exists():
            return 0
        return sum(1 for line in self.outbox.read_text(encoding="utf-8").splitlines() if line.strip())

    # -- sessions -------------------------------------------------------------------------------------

    def start_session(self, title: str, tags: list[str] | None = None) -> Session:
        from memory_sync.log import EventError
        from memory_sync.secret_scan import check_value, redact
        from memory_sync.views import check_payload

        if not isinstance(title, str) or not title.strip():
            raise EventError("a session needs a title")
        tags = list(tags or [])
        if any(not isinstance(t, str) or not t.strip() for t in tags):
            raise EventError("field 'tags': every tag must be a non-empty text")
        check_payload({"title": title, "tags": tags}, "session")
        if self.redact_secrets:
            title, tags = redact(title, self.root), redact(tags, self.root)
        else:
            check_value({"title": title, "tags": tags}, "session", self.root)
        s = start_session(self.root, title, tags)
        self.write({"op": "events", "session": s.meta(), "events": []})
        return s

    def session(self, sid: str) -> Session:
        """By id or a unique prefix of it."""
        from memory_sync.views import resolve

        return open_session(self.root, resolve(self.root, sid))

    def log(self, session: Session | str, kind: str, payload: dict) -> dict:
        """Append an event (validated for its kind) to the session's log and mirror it to both stores."""
        from memory_sync.views import append_checked

        session = self.session(session) if isinstance(session, str) else session
        ev = append_checked(session, kind, payload, redact_secrets=self.redact_secrets)
        self.write({"op": "events", "session": session.meta(), "events": [ev]})
        return ev

    # the calls an assistant or a script makes (the CLI is a thin shell over these)

    def turn(self, sid: str, role: str, text: str) -> dict:
        return self.log(sid, "turn", {"role": role, "text": text})

    def note(self, sid: str, text: str, pinned: bool = False) -> dict:
        return self.log(sid, "note", {"text": text, **({"pinned": True} if pinned else {})})

    def decide(self, sid: str, text: str, why: str | None = None) -> dict:
        return self.log(sid, "decision", {"text": text, **({"why": why} if why is not None else {})})

    def set_state(self, sid: str, **payload) -> dict:
        return self.log(sid, "state", payload)

    def close_session(self, sid: str) -> dict:
        return self.log(sid, "state", {"status": "closed"})

    def sessions(self) -> list[dict]:
        from memory_sync.views import list_sessions

        return list_sessions(self.root)

    def context(self, sid: str, budget: int = 4096, threshold: float = 0.75, count_tokens=None) -> dict:
        """What `duet session resume` prints: the three-tier context within ``budget`` tokens."""
        from memory_sync import context
        from memory_sync.search import store_docs

        return context.build(self.root, sid, budget=budget, threshold=threshold, store_docs=store_docs(self),
                             count_tokens=count_tokens)

    def handoff(self, sid: str) -> Path:
        from memory_sync.views import write_handoff

        self.log(sid, "handoff", {"host": self.host})
        return write_handoff(self.root, sid)

    def hypothesize(self, sid: str | None, hid: str, text: str, confidence: float, links: dict | None = None) -> dict:
        """A hypothesis in the neocortex (confidence checked first), noted in the session when given."""
        from memory_sync.neocortex import HypothesisError, check_confidence, check_hypothesis_id
        from memory_sync.secret_scan import check_value
        from memory_sync.views import check_payload

        check_confidence(confidence)
        check_hypothesis_id(hid)
        if not isinstance(text, str) or not text.strip():
            raise HypothesisError("a hypothesis needs non-empty text")
        check_payload({"text": text, "links": links or {}}, "hypothesis")
        check_value({"id": hid, "text": text, "links": links or {}}, "hypothesis", self.root)
        n = self.neocortex()
        if n is None:
            raise HypothesisError("no neocortex configured (DUET_MONGO_URL, or `duet up`)")
        h = n.add_hypothesis(hid, text, confidence, links={**(links or {}), **({"session_id": sid} if sid else {})})
        if sid:
            self.log(sid, "note", {"hypothesis": {"id": hid, "text": text, "confidence": confidence}})
        return h

    def search(self, query: str, threshold: float = 0.75, limit: int = 10) -> dict:
        from memory_sync.search import search, store_docs, workspace_docs

        return search(query, workspace_docs(self.root) + store_docs(self), threshold=threshold, limit=limit)

    def sync(self, remote: str = "origin") -> dict:
        from memory_sync.sync import sync

        return sync(self.root, self, remote=remote)

    def backup(self, out: str | os.PathLike) -> dict:
        from memory_sync.backup import backup

        return backup(self.root, out, self)

    def restore(self, bundle: str | os.PathLike, expect_sha: str | None = None) -> dict:
        from memory_sync.backup import restore

        return restore(bundle, self.root, self, expect_sha)

    @property
    def host(self) -> str:
        from memory_sync.log import host_name

        return host_name()

    def sync_session(self, session: Session) -> None:
        """Upsert every event of the session (idempotent)."""
        self.write({"op": "events", "session": session.meta(), "events": session.events()})

    # -- facts and hypotheses ---------------------------------------------------------------------------

    def add_fact(self, text: str, provenance: dict, **kw) -> bool:
        """A validated fact in the cortex; what it holds is scanned like an event (refused, or
        redacted with ``redact_secrets``)."""
        return self.write(self._clean({"op": "fact", "text": text, "provenance": provenance, **kw}, "fact"))

    def _clean(self, value, field: str):
        from memory_sync.secret_scan import check_value, redact

        if self.redact_secrets:
            return redact(value, self.root)
        check_value(value, field, self.root)
        return value

    def promote(self, hid: str, evidence: dict, provenance: dict, sid: str | None = None) -> dict:
        """Write a validated fact for a hypothesis and mark it promoted (never deleted); with ``sid``
        the session is the fact's provenance and gets a note of the promotion."""
        from memory_sync.views import check_payload

        check_payload(evidence, "evidence")
        provenance = {**provenance, **({"session_id": sid} if sid else {})}
        self._clean({"evidence": evidence, "provenance": provenance}, "promote")
        n = self.neocortex()
        h = n.update_hypothesis(hid, evidence=evidence)
        self.add_fact(h["text"], {**provenance, "hypothesis": hid, "evidence": h["evidence"]},
                      kind="promoted-hypothesis", dedup_key=f"hypothesis:{hid}")
        doc = n.update_hypothesis(hid, status="promoted")
        if sid:
            self.log(sid, "note", {"text": f"promoted {hid}: {doc['text']}", "hypothesis_id": hid, "status": "promoted"})
        return doc
