"""Neocortex: hypotheses (confidence 0.3-0.9) and an event mirror in MongoDB (pymongo).

Portable operations only, so the same code runs on MongoDB 7 and on the nx-27017 wire server
used in tests and embedded mode. Avoided on purpose (nx-27017 gets them wrong):
- ``$push`` of a sub-document (stored as a string there): evidence lists are rewritten whole
  with ``$set`` after a read, guarded by the document's ``rev`` field;
- relying on a unique index to reject a document that lacks the key: every insert sets the key.

Collections migrate through MIGRATIONS, recorded in ``duet_migrations``.
"""

from __future__ import annotations

import datetime as dt
import re

CONFIDENCE_MIN, CONFIDENCE_MAX = 0.3, 0.9
STATUSES = ("open", "promoted", "rejected")
COLLECTIONS = ("hypotheses", "events")


class HypothesisError(ValueError):
    pass


def _m1(db) -> None:
    db.events.create_index("id", unique=True)
    db.events.create_index([("session_id", 1), ("id", 1)])
    db.hypotheses.create_index("id", unique=True)
    db.hypotheses.create_index("status")


MIGRATIONS = [_m1]


HYPOTHESIS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")


def check_hypothesis_id(hid: object) -> str:
    if not isinstance(hid, str) or not HYPOTHESIS_ID.fullmatch(hid):
        raise HypothesisError(f"hypothesis id {hid!r}: use 1-128 letters, digits, '.', '_', ':' or '-' "
                              "(starting with a letter or digit)")
    return hid


def check_confidence(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HypothesisError(f"confidence must be a number in [{CONFIDENCE_MIN}, {CONFIDENCE_MAX}], got {value!r}")
    if not CONFIDENCE_MIN <= float(value) <= CONFIDENCE_MAX:
        raise HypothesisError(f"confidence {value} is outside [{CONFIDENCE_MIN}, {CONFIDENCE_MAX}] "
                              "(hypotheses are never certain; validated facts go to the cortex)")
    return float(value)


class Neocortex:
    """A connection to the neocortex; ``migrate()`` before first use. A ``Store`` (memory_sync/stores.py)."""

    kind = "neocortex"
    names = COLLECTIONS

    def __init__(self, url: str, db_name: str | None = None, timeout_ms: int = 5000):
        """``db_name``: else the database the URL names (mongodb://host:port/NAME), else "duet"."""
        import pymongo

        self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms,
                                          connectTimeoutMS=timeout_ms)
        self.db = self.client[db_name] if db_name else self.client.get_default_database(default="duet")

    def close(self) -> None:
        self.client.close()

    def migrate(self) -> int:
        done = {d["version"] for d in self.db.duet_migrations.find({}, {"version": 1})}
        for version, fn in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            fn(self.db)
            self.db.duet_migrations.insert_one({"version": version,
                                                "applied": dt.datetime.now(dt.timezone.utc).isoformat()})
        return len(MIGRATIONS)

    def upsert_events(self, session_id: str, events: list[dict]) -> int:
        """Insert events not yet present (by id), in batches; returns how many were new."""
        new = 0
        for i in range(0, len(events), 1000):
            batch = events[i:i + 1000]
            have = {d["id"] for d in self.db.events.find({"id": {"$in": [e["id"] for e in batch]}}, {"id": 1})}
            docs = [{**e, "session_id": session_id} for e in batch if e["id"] not in have]
            if docs:
                # plain inserts (upserts are 50x slower on the Mongo-wire server); the unique index on
                # id still refuses a duplicate a concurrent writer inserted meanwhile
                try:
                    new += len(self.db.events.insert_many(docs, ordered=False).inserted_ids)
                except Exception as exc:  # BulkWriteError: count what went in, ignore duplicates only
                    from pymongo.errors import BulkWriteError

                    if not isinstance(exc, BulkWriteError) or any(e.get("code") != 11000 for e in exc.details["writeErrors"]):
                        raise
                    new += exc.details["nInserted"]
        return new

    def add_hypothesis(self, hid: str, text: str, confidence: float, *, evidence: list[dict] | None = None,
                       links: dict | None = None) -> dict:
        conf = check_confidence(confidence)
        if not text.strip():
            raise HypothesisError("hypothesis text is empty")
        doc = {"id": hid, "text": text, "confidence": conf, "status": "open", "evidence": evidence or [],
               "links": links or {}, "rev": 0, "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        self.db.hypotheses.update_one({"id": hid}, {"$setOnInsert": doc}, upsert=True)
        return self.get_hypothesis(hid)

    def get_hypothesis(self, hid: str) -> dict:
        doc = self.db.hypotheses.find_one({"id": hid}, {"_id": 0})
        if doc is None:
            raise HypothesisError(f"unknown hypothesis {hid!r}")
        return doc

    def update_hypothesis(self, hid: str, *, evidence: dict | None = None, confidence: float | None = None,
                          status: str | None = None) -> dict:
        """Add evidence / change confidence or status; a read-modify-write guarded by ``rev``."""
        if status is not None and status not in STATUSES:
            raise HypothesisError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if confidence is not None:
            check_confidence(confidence)
        for _ in range(5):
            doc = self.get_hypothesis(hid)
            upd: dict = {"rev": doc["rev"] + 1}
            if evidence is not None:
                upd["evidence"] = list(doc.get("evidence", [])) + [evidence]
            if confidence is not None:
                upd["confidence"] = float(confidence)
            if status is not None:
                upd["status"] = status
            res = self.db.hypotheses.update_one({"id": hid, "rev": doc["rev"]}, {"$set": upd})
            if res.modified_count == 1:
                return self.get_hypothesis(hid)
        raise HypothesisError(f"hypothesis {hid!r} is being changed concurrently; try again")

    def count(self, collection: str) -> int:
        return self.db[collection].count_documents({})

    def dump(self, collection: str) -> list[dict]:
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}")
        return list(self.db[collection].find({}, {"_id": 0}).sort("id", 1))

    def load(self, collection: str, docs: list[dict]) -> int:
        """Insert dumped documents as they were; ones whose id exists are left alone."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}")
        for d in docs:
            self.db[collection].update_one({"id": d["id"]}, {"$setOnInsert": d}, upsert=True)
        return len(docs)

    def restore(self, dumps: dict[str, list[dict]]) -> None:
        """A backup's documents into empty collections; on a failure what it inserted is removed again."""
        done: dict[str, list[dict]] = {}
        try:
            for col in COLLECTIONS:
                done[col] = dumps.get(col, [])
                self.load(col, done[col])
        except BaseException:
            self.undo_restore(done)
            raise

    def undo_restore(self, dumps: dict[str, list[dict]]) -> None:
        for col, docs in dumps.items():
            self.remove(col, [d["id"] for d in docs if isinstance(d, dict) and "id" in d])

    def remove(self, collection: str, ids: list) -> None:
        """Delete documents by id (a restore undoing its own inserts after a later step failed)."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown collection {collection!r}")
        for i in range(0, len(ids), 500):
            self.db[collection].delete_many({"id": {"$in": ids[i:i + 500]}})
