"""Cortex: validated memory in PostgreSQL (psycopg 3).

Tables: sessions, events (idempotent upsert by event id), facts (confidence 1.0, with
provenance), runs (mirror of run.json), alerts. The schema migrates through MIGRATIONS, an
ordered list applied once each and recorded in ``duet_schema_version``.
"""

from __future__ import annotations

import json

MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL, host TEXT NOT NULL,
        tags JSONB NOT NULL DEFAULT '[]', created TIMESTAMPTZ NOT NULL);
    CREATE TABLE events (
        id TEXT PRIMARY KEY, session_id TEXT NOT NULL REFERENCES sessions(id),
        host TEXT NOT NULL, time TIMESTAMPTZ NOT NULL, kind TEXT NOT NULL,
        payload JSONB NOT NULL, schema_version INT NOT NULL);
    CREATE INDEX events_session_time ON events(session_id, id);
    CREATE TABLE facts (
        id BIGSERIAL PRIMARY KEY, text TEXT NOT NULL,
        confidence DOUBLE PRECISION NOT NULL CHECK (confidence = 1.0),
        kind TEXT NOT NULL DEFAULT 'pattern', data JSONB NOT NULL DEFAULT '{}',
        provenance JSONB NOT NULL, created TIMESTAMPTZ NOT NULL DEFAULT now(),
        dedup_key TEXT UNIQUE);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, status TEXT NOT NULL, dataset_hash TEXT, host TEXT,
        record JSONB NOT NULL, updated TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE alerts (
        id TEXT PRIMARY KEY, run_id TEXT, rule TEXT NOT NULL, severity TEXT NOT NULL,
        message TEXT NOT NULL, time TIMESTAMPTZ NOT NULL);
    """,
]


TABLES = ("sessions", "events", "facts", "runs", "alerts")
COLUMNS = {  # what a dump row may hold (a backup's rows are checked against it before any SQL)
    "sessions": {"id", "title", "status", "host", "tags", "created"},
    "events": {"id", "session_id", "host", "time", "kind", "payload", "schema_version"},
    "facts": {"id", "text", "confidence", "kind", "data", "provenance", "created", "dedup_key"},
    "runs": {"id", "status", "dataset_hash", "host", "record", "updated"},
    "alerts": {"id", "run_id", "rule", "severity", "message", "time"},
}
_JSONB = {"tags", "payload", "data", "provenance", "record"}


class Cortex:
    """A connection to the cortex; ``migrate()`` before first use. A ``Store`` (memory_sync/stores.py)."""

    kind = "cortex"
    names = TABLES

    def __init__(self, url: str, connect_timeout: float = 5):
        import psycopg

        self.url = url
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=int(connect_timeout))

    def close(self) -> None:
        self.conn.close()

    def migrate(self) -> int:
        """Apply pending migrations in order; returns the schema version."""
        with self.conn.transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS duet_schema_version ("
                              "version INT PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())")
            self.conn.execute("LOCK TABLE duet_schema_version IN EXCLUSIVE MODE")
            row = self.conn.execute("SELECT coalesce(max(version), 0) FROM duet_schema_version").fetchone()
            current = row[0]
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                self.conn.execute(sql)
                self.conn.execute("INSERT INTO duet_schema_version(version) VALUES (%s)", (version,))
                current = version
        return current

    def upsert_session(self, meta: dict) -> None:
        self.conn.execute(
            "INSERT INTO sessions(id, title, status, host, tags, created) VALUES (%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (id) DO UPDATE SET title=EXCLUDED.title, status=EXCLUDED.status, tags=EXCLUDED.tags",
            (meta["id"], meta["title"], meta["status"], meta["host"], json.dumps(meta.get("tags", [])),
             meta["created"]))

    def upsert_events(self, session_id: str, events: list[dict]) -> int:
        """Insert events not yet present (by id); returns how many were new."""
        if not events:
            return 0
        with self.conn.transaction():
            with self.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO events(id, session_id, host, time, kind, payload, schema_version) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO NOTHING",
                    [(e["id"], session_id, e["host"], e["time"], e["kind"], json.dumps(e["payload"]),
                      e["schema_version"]) for e in events])
                new = cur.rowcount
        return max(new, 0)

    def add_fact(self, text: str, provenance: dict, *, kind: str = "pattern", data: dict | None = None,
                 dedup_key: str | None = None) -> int:
        """Write a validated fact (confidence 1.0). Same dedup_key twice -> one row."""
        row = self.conn.execute(
            "INSERT INTO facts(text, confidence, kind, data, provenance, dedup_key) "
            "VALUES (%s, 1.0, %s, %s, %s, %s) ON CONFLICT (dedup_key) DO UPDATE SET text=EXCLUDED.text "
            "RETURNING id",
            (text, kind, json.dumps(data or {}), json.dumps(provenance), dedup_key)).fetchone()
        return row[0]

    def facts(self, kind: str | None = None) -> list[dict]:
        q = "SELECT id, text, confidence, kind, data, provenance FROM facts"
        args: tuple = ()
        if kind:
            q += " WHERE kind = %s"
            args = (kind,)
        rows = self.conn.execute(q + " ORDER BY id", args).fetchall()
        return [dict(zip(("id", "text", "confidence", "kind", "data", "provenance"), r)) for r in rows]

    def upsert_run(self, record: dict) -> None:
        self.conn.execute(
            "INSERT INTO runs(id, status, dataset_hash, host, record) VALUES (%s,%s,%s,%s,%s) "
            "ON CONFLICT (id) DO UPDATE SET status=EXCLUDED.status, record=EXCLUDED.record, updated=now()",
            (record["run_id"], record["status"], record.get("dataset", {}).get("content_hash"),
             record.get("host", {}).get("hostname"), json.dumps(record, default=str)))

    def count(self, table: str) -> int:
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        return self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def dump(self, table: str) -> list[dict]:
        """Every row of ``table`` as JSON-ready dicts (times as ISO-8601), in primary-key order."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        cur = self.conn.execute(f"SELECT * FROM {table} ORDER BY id")
        cols = [c.name for c in cur.description]
        return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in zip(cols, row)}
                for row in cur.fetchall()]

    def load(self, table: str, rows: list[dict]) -> int:
        """Insert dumped rows as they were (ids included); existing ids are left alone."""
        return self.load_all({table: rows})[table]

    def restore(self, dumps: dict[str, list[dict]]) -> None:
        """A backup's rows into empty tables, all or nothing (one transaction)."""
        self.load_all(dumps)

    def undo_restore(self, dumps: dict[str, list[dict]]) -> None:
        """Take a restore back (the tables were empty before it: backup.restore checks)."""
        with self.conn.transaction():
            for t in reversed(TABLES):
                self.conn.execute(f"DELETE FROM {t}")

    def load_all(self, dumps: dict[str, list[dict]]) -> dict[str, int]:
        """Insert every table's dumped rows in one transaction (all or nothing), in TABLES order
        (sessions before events: the foreign key). Columns are checked against COLUMNS first."""
        for table, rows in dumps.items():
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}")
            for i, r in enumerate(rows):
                if not isinstance(r, dict) or not r.keys() <= COLUMNS[table] or "id" not in r:
                    extra = sorted(set(r) - COLUMNS[table]) if isinstance(r, dict) else type(r).__name__
                    raise ValueError(f"cortex/{table}.jsonl row {i + 1}: not a {table} row ({extra or 'no id'}); "
                                     f"columns are {', '.join(sorted(COLUMNS[table]))}")
        out = {}
        with self.conn.transaction():
            for table in TABLES:
                rows = dumps.get(table) or []
                out[table] = len(rows)
                with self.conn.cursor() as cur:
                    for r in rows:
                        cols = sorted(r)
                        cur.execute(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
                                    "ON CONFLICT (id) DO NOTHING",
                                    tuple(json.dumps(r[c]) if c in _JSONB else r[c] for c in cols))
                if table == "facts" and rows:
                    self.conn.execute("SELECT setval(pg_get_serial_sequence('facts', 'id'), "
                                      "(SELECT coalesce(max(id), 1) FROM facts))")
        return {t: out[t] for t in dumps}
