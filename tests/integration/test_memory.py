"""Sessions that resume on the other host, synced through git with nothing lost; real git (two clones
and a bare remote), real PostgreSQL and Mongo-wire servers, the real `duet` CLI."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra import services
from memory_sync.log import open_session, read_events
from memory_sync.memory import Memory
from memory_sync.views import write_handoff
from memory_sync.sync import sync
from memory_sync.workspace import Workspace

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def duet(*args, env=None, stdin=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), "DUET_EMBEDDER": "hashing", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120,
                          env=e, input=stdin)


def two_hosts(tmp: Path) -> tuple[Workspace, Workspace]:
    """Host A and host B: clones of one bare remote, each with duet's merge drivers registered."""
    bare = Workspace(tmp / "origin").init().bare_copy(tmp / "remote.git")
    return Workspace.clone(bare, tmp / "a"), Workspace.clone(bare, tmp / "b")


def event_files(ws: Workspace) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted((ws.root / "sessions").glob("*/events.jsonl"))}


def derived(ws: Workspace) -> dict[str, str]:
    return {p.parent.name: p.read_text() for p in sorted((ws.root / "sessions").glob("*/handoff.md"))}


OPS = st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["shared", "own", "new", "sync", "handoff"])),
               min_size=3, max_size=9)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_concurrent_offline_writes_sync_in_any_order_without_loss(tmp_path_factory, ops):
    tmp = tmp_path_factory.mktemp("sync")
    a, b = two_hosts(tmp)
    ma, mb = Memory(a.root, None, None), Memory(b.root, None, None)
    shared = ma.start_session("shared work")
    sync(a.root)
    sync(b.root)
    own = {"a": ma.start_session("a's own"), "b": mb.start_session("b's own")}
    written: dict[str, set] = {}
    for i, (host, op) in enumerate(ops):
        ws, m = (a, ma) if host == "a" else (b, mb)
        os.environ["DUET_HOST_NAME"] = f"host-{host}"
        try:
            if op == "shared":
                ev = m.turn(shared.id, "user", f"{host} says {i}")
                written.setdefault(shared.id, set()).add(ev["id"])
            elif op == "own":
                ev = m.note(own[host].id, f"{host} note {i}")
                written.setdefault(own[host].id, set()).add(ev["id"])
            elif op == "new":
                s = m.start_session(f"{host} session {i}")
                written.setdefault(s.id, set()).add(m.decide(s.id, f"decided {i}")["id"])
            elif op == "handoff":
                write_handoff(ws.root, shared.id)
            else:
                sync(ws.root)
        finally:
            os.environ["DUET_HOST_NAME"] = "test-host"
    for ws in (a, b, a):  # everyone syncs at the end, in some order
        sync(ws.root)
    fa, fb = event_files(a), event_files(b)
    assert fa == fb  # same files, same order, on both hosts
    for sid, ids in written.items():
        got = [e["id"] for e in read_events(a.root / "sessions" / sid / "events.jsonl")]
        assert len(got) == len(set(got))  # each event once
        assert ids <= set(got)  # none lost
    assert derived(a) == derived(b)  # rebuilt, never merged
    assert not a.repo.is_dirty(untracked_files=True) and not b.repo.is_dirty(untracked_files=True)


def test_resume_on_the_other_host_prints_the_same_context(tmp_path):
    a, b = two_hosts(tmp_path)
    wa, wb = ["-w", str(a.root)], ["-w", str(b.root)]
    sid = duet("session", "start", "persona tuning", "--tag", "lora", *wa).stdout.strip()
    for i in range(30):
        assert duet("session", "log", sid, "--role", "user" if i % 2 == 0 else "assistant",
                    f"turn {i}: we looked at the loss curve and the learning rate warmup again.", *wa).returncode == 0
    duet("session", "note", sid, "--pin", "The GPU host has 24 GB; keep sequences at 1024.", *wa)
    duet("session", "decide", sid, "LoRA r=16 on all linear layers", "--why", "r=8 underfit", *wa)
    duet("session", "state", sid, "--next", "run DPO on the new pairs", *wa)
    assert duet("memory", "sync", *wa).returncode == 0
    r = duet("memory", "sync", "--json", *wb)
    assert r.returncode == 0, r.stderr
    ctx_a = duet("session", "resume", sid[:10], "--budget", "600", *wa)
    ctx_b = duet("session", "resume", sid[:10], "--budget", "600", *wb)
    assert ctx_a.returncode == 0 and ctx_a.stdout == ctx_b.stdout
    assert "LoRA r=16" in ctx_b.stdout and "run DPO on the new pairs" in ctx_b.stdout
    assert "turn 29:" in ctx_b.stdout  # the latest turn verbatim
    assert "saturation" not in ctx_b.stdout and "%" in ctx_b.stderr  # the budget report goes to stderr
    doc = json.loads(duet("session", "resume", sid, "--budget", "600", "--json", *wb).stdout)
    assert doc["tokens"] <= 600 and doc["left_out"]["turns_not_verbatim"] > 0  # a small budget drops turns ...
    raw = duet("session", "show", sid, "--raw", "--range", "1:3", *wb).stdout.splitlines()
    assert [json.loads(x)["payload"]["text"][:7] for x in raw] == ["turn 0:", "turn 1:", "turn 2:"]  # ... kept raw


def test_postgres_outage_queues_writes_and_sync_flushes_them(tmp_path):
    ws = Workspace(tmp_path / "ws").init()
    sd = tmp_path / "pg"
    pg = services.start_postgres(sd)
    env = {"DUET_POSTGRES_URL": pg.url}
    try:
        sid = duet("session", "start", "outage", "-w", str(ws.root), env=env).stdout.strip()
        assert duet("session", "log", sid, "--role", "user", "before", "-w", str(ws.root), env=env).returncode == 0
        services.stop_postgres(sd)
        for i in range(4):  # Postgres is down: nothing blocks, nothing fails
            r = duet("session", "log", sid, "--role", "user", f"during {i}", "-w", str(ws.root), env=env)
            assert r.returncode == 0, r.stderr
        assert Memory(ws.root, None, None).pending() == 4
        pg = services.start_postgres(sd)
        r = duet("memory", "sync", "--json", "-w", str(ws.root), env={"DUET_POSTGRES_URL": pg.url})
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["outbox_flushed"] == 4 and doc["outbox_pending"] == 0
        m = Memory(ws.root, pg.url, None)
        assert m.cortex().count("events") == len(open_session(ws.root, sid).events()) == 5
        m.close()
    finally:
        services.stop_postgres(sd)


def test_bad_input_is_refused_and_nothing_changes(tmp_path, fresh_db):
    a, b = two_hosts(tmp_path)
    env = {"DUET_POSTGRES_URL": fresh_db["postgres_url"], "DUET_MONGO_URL": fresh_db["mongo_url"]}
    sid = duet("session", "start", "s", "-w", str(a.root), env=env).stdout.strip()
    duet("session", "log", sid, "--role", "user", "hello", "-w", str(a.root), env=env)
    assert duet("memory", "sync", "-w", str(a.root), env=env).returncode == 0
    assert duet("memory", "sync", "-w", str(b.root), env=env).returncode == 0

    # a malformed event line arrives in a pulled file: refused with file and line; B is unchanged
    path = a.root / "sessions" / sid / "events.jsonl"
    path.write_text(path.read_text() + '{"id": "not-a-ulid"}\n')
    a.commit(["sessions"], "a broken line, committed by hand")
    a.repo.git.push("origin", "HEAD:main")
    head_b = b.repo.head.commit.hexsha
    before = event_files(b)
    r = duet("memory", "sync", "-w", str(b.root), env=env)
    assert r.returncode == 1 and f"sessions/{sid}/events.jsonl:2" in r.stderr
    assert b.repo.head.commit.hexsha == head_b and event_files(b) == before

    # hypotheses: confidence outside [0.3, 0.9] refused, nothing stored
    for bad in ("1.5", "0.1"):
        r = duet("memory", "hypothesize", "r=8 is enough", "--confidence", bad, "-w", str(b.root), env=env)
        assert r.returncode == 1 and "outside [0.3, 0.9]" in r.stderr
    m = Memory(b.root, fresh_db["postgres_url"], fresh_db["mongo_url"])
    assert m.neocortex().count("hypotheses") == 0

    # an unknown session id: refused, named
    n_events = m.cortex().count("events")
    r = duet("session", "log", "01nosuchsession", "--role", "user", "hi", "-w", str(b.root), env=env)
    assert r.returncode == 1 and "unknown session '01nosuchsession'" in r.stderr
    # a bad argument is invalid input (exit 1; argparse's own 2 would read as "refused")
    r = duet("session", "log", sid, "--role", "robot", "hi", "-w", str(b.root), env=env)
    assert r.returncode == 1 and "invalid choice" in r.stderr
    assert m.cortex().count("events") == n_events
    m.close()


def test_backup_restore_round_trip_and_a_tampered_bundle_is_refused(tmp_path, fresh_db, stores):
    import uuid

    import psycopg

    env = {"DUET_POSTGRES_URL": fresh_db["postgres_url"], "DUET_MONGO_URL": fresh_db["mongo_url"]}
    ws = tmp_path / "ws"
    sid = duet("session", "start", "to back up", "-w", str(ws), env=env).stdout.strip()
    for i in range(5):
        duet("session", "log", sid, "--role", "user", f"line {i}", "-w", str(ws), env=env)
    assert duet("session", "handoff", sid, "-w", str(ws), env=env).returncode == 0
    r = duet("memory", "hypothesize", "warmup 5% beats 10%", "--confidence", "0.6", "--id", "h-warm",
             "--session", sid, "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr
    r = duet("memory", "promote", "h-warm", "--evidence", '{"run": "r1", "eval_loss": 1.2}', "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "backup.tar.gz"
    r = duet("memory", "backup", str(out), "--json", "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["counts"]["events"] == 7  # 5 turns, the handoff, the hypothesis note and made["counts"]["cortex"]["facts"] == 1
    assert made["counts"]["neocortex"]["hypotheses"] == 1

    # restore into an empty workspace and empty stores: the same counts and file hashes
    name = "r" + uuid.uuid4().hex[:12]
    with psycopg.connect(stores["postgres"].url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    env2 = {"DUET_POSTGRES_URL": stores["postgres"].url.rsplit("/", 1)[0] + "/" + name,
            "DUET_MONGO_URL": f"{stores['mongo'].url.rstrip('/')}/{name}"}
    r = duet("memory", "restore", str(out), "--expect", made["manifest_sha256"], "--json", "-w", str(tmp_path / "ws2"),
             env=env2)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"] == made["counts"]
    again = json.loads(duet("memory", "backup", str(tmp_path / "again.tar.gz"), "--json", "-w", str(tmp_path / "ws2"),
                            env=env2).stdout)
    files = lambda p: json.loads(tarfile.open(p).extractfile("manifest.json").read())["files"]  # noqa: E731
    assert files(out) == files(tmp_path / "again.tar.gz") and again["counts"] == made["counts"]
    # restoring over live data is refused
    r = duet("memory", "restore", str(out), "-w", str(tmp_path / "ws2"), env=env2)
    assert r.returncode == 1 and "empty" in r.stderr

    # a tampered bundle: one event line changed, the manifest left as it was
    bad = tmp_path / "tampered.tar.gz"
    with tarfile.open(out) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith("events.jsonl"):
                data = data.replace(b"line 3", b"line 9")
            m.size = len(data)
            dst.addfile(m, __import__("io").BytesIO(data))
    r = duet("memory", "restore", str(bad), "-w", str(tmp_path / "ws3"))
    assert r.returncode == 1 and "does not match its sha256" in r.stderr
    assert not (tmp_path / "ws3" / "sessions").exists() or not any((tmp_path / "ws3" / "sessions").glob("*/session.json"))
