"""Cortex and neocortex against real servers (embedded PostgreSQL, nx-27017 Mongo-wire)."""

import pytest

from infra import services
from memory_sync.cortex import Cortex
from memory_sync.log import start_session
from memory_sync.memory import Memory
from memory_sync.neocortex import HypothesisError, Neocortex

pytestmark = pytest.mark.integration


def test_cortex_migrations_and_idempotent_event_upserts(fresh_db, tmp_path):
    c = Cortex(fresh_db["postgres_url"])
    assert c.migrate() == 1
    assert c.migrate() == 1  # applying twice changes nothing
    s = start_session(tmp_path, "t")
    evs = [s.append("note", {"i": i}) for i in range(5)]
    c.upsert_session(s.meta())
    assert c.upsert_events(s.id, evs) == 5
    assert c.upsert_events(s.id, evs) == 0
    assert c.count("events") == 5
    fid = c.add_fact("peak 3 GiB", {"run_id": "r"}, dedup_key="m:r")
    assert c.add_fact("peak 3 GiB", {"run_id": "r"}, dedup_key="m:r") == fid
    assert c.facts()[0]["confidence"] == 1.0
    c.close()


def test_neocortex_refuses_out_of_range_confidence_and_keeps_evidence(fresh_db):
    n = Neocortex(fresh_db["mongo_url"], db_name=fresh_db["mongo_db"])
    n.migrate()
    for bad in (1.5, 0.1, 1.0, "0.5", True):
        with pytest.raises(HypothesisError):
            n.add_hypothesis("h-bad", "x", bad)
    assert n.count("hypotheses") == 0
    n.add_hypothesis("h1", "r=8 is enough for phase one", 0.5)
    n.update_hypothesis("h1", evidence={"run": "a", "loss": 1.2})
    h = n.update_hypothesis("h1", evidence={"run": "b", "loss": 1.1})
    assert h["evidence"] == [{"run": "a", "loss": 1.2}, {"run": "b", "loss": 1.1}]  # real sub-documents
    with pytest.raises(HypothesisError, match="unknown hypothesis"):
        n.update_hypothesis("nope", status="rejected")
    n.close()


def test_promotion_writes_a_fact_and_never_deletes_the_hypothesis(fresh_db, tmp_path):
    m = Memory(tmp_path, fresh_db["postgres_url"], fresh_db["mongo_url"])
    m._neocortex = Neocortex(fresh_db["mongo_url"], db_name=fresh_db["mongo_db"])
    m._neocortex.migrate()
    m.neocortex().add_hypothesis("h2", "LoRA lowers held-out loss", 0.6)
    h = m.promote("h2", {"run_id": "r1", "after": 1.0}, {"run_id": "r1"})
    assert h["status"] == "promoted" and m.neocortex().count("hypotheses") == 1
    facts = m.cortex().facts("promoted-hypothesis")
    assert facts[0]["text"] == "LoRA lowers held-out loss" and facts[0]["provenance"]["hypothesis"] == "h2"
    m.close()


def test_outbox_keeps_writes_while_postgres_is_down_and_flushes_after(tmp_path):
    sd = tmp_path / ".duet"
    pg = services.start_postgres(sd)
    try:
        m = Memory(tmp_path, pg.url, None)
        s = start_session(tmp_path, "outage")
        m.log(s, "note", {"text": "before"})
        services.stop_postgres(sd)
        assert not services.pid_alive(pg.pid)
        for i in range(3):
            m.log(s, "note", {"text": f"during {i}"})  # must not raise or block
        assert m.pending() == 3
        pg2 = services.start_postgres(sd)
        m.postgres_url = pg2.url
        assert m.flush() == 3 and m.pending() == 0
        assert m.cortex().count("events") == len(s.events()) == 4
        m.close()
    finally:
        services.stop_postgres(sd)


def test_services_are_reused_and_stopped_by_pid(tmp_path):
    sd = tmp_path / ".duet"
    a = services.start_mongo(sd)
    b = services.start_mongo(sd)
    assert a.pid == b.pid
    assert services.stop_mongo(sd)
    assert not services.pid_alive(a.pid)
    assert services.StateFile(sd).read() == {}


def test_a_store_that_refuses_part_of_a_restore_keeps_none_of_it(fresh_db):
    """Store.restore is all or nothing on both backends (backup.restore relies on it)."""
    c = Cortex(fresh_db["postgres_url"])
    c.migrate()
    good = {"id": "s1", "title": "t", "status": "open", "host": "h", "tags": [], "created": "2026-12-01T00:00:00+00:00"}
    with pytest.raises(Exception):  # the second session's created is no time: the transaction rolls back
        c.restore({"sessions": [good, {**good, "id": "s2", "created": "not a time"}], "events": [], "facts": [],
                   "runs": [], "alerts": []})
    assert c.count("sessions") == 0
    c.close()
    n = Neocortex(fresh_db["mongo_url"], db_name=fresh_db["mongo_db"])
    n.migrate()
    with pytest.raises(Exception):  # the events collection holds a document without an id
        n.restore({"hypotheses": [{"id": "h1", "text": "x", "confidence": 0.5, "status": "open"}],
                   "events": [{"no": "id"}]})
    assert n.count("hypotheses") == 0 and n.count("events") == 0
    n.close()
