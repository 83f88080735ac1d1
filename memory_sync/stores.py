"""The interface the two stores share: ``Cortex`` (PostgreSQL, validated facts) and ``Neocortex``
(a MongoDB-wire server, hypotheses) both implement ``Store``. Counting, backup and restore
(backup.py) and the architect's counts go through these methods; a third backend implements them in
its own file and is added to ``Memory.stores()``.

Backend-specific queries stay on the backend (facts and runs on the cortex, hypotheses on the
neocortex). Portability on the Mongo side: no ``$push`` of sub-documents and no reliance on a
unique index rejecting a document without the key (the Mongo-wire server used in tests lacks them).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Store(Protocol):
    kind: str                 # "cortex", "neocortex": the folder of its dumps in a backup
    names: tuple[str, ...]    # its tables (collections), in the order a restore writes them

    def migrate(self) -> int:
        """Apply the ordered schema migrations not yet applied; the schema version after."""

    def upsert_events(self, session_id: str, events: list[dict]) -> int:
        """Idempotent: an event id already stored is left as it is; the number written."""

    def count(self, name: str) -> int:
        """Rows (documents) in one table (collection)."""

    def dump(self, name: str) -> list[dict]:
        """Every row of a table as JSON-ready dicts, in id order (what a backup holds)."""

    def load(self, name: str, rows: list[dict]) -> int:
        """Insert dumped rows as they were; ids that exist are left alone (what a restore does)."""

    def restore(self, dumps: dict[str, list[dict]]) -> None:
        """A backup's dumps ({name: rows}) into empty tables, all or nothing."""

    def undo_restore(self, dumps: dict[str, list[dict]]) -> None:
        """Take back a restore of ``dumps`` (after a later step of the restore failed)."""

    def close(self) -> None:
        ...
