
import pytest

from memory_sync.log import EventError, make_event, new_event_id, read_events, start_session, validate_event


def test_event_ids_are_unique_and_time_ordered():
    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


def test_session_log_is_append_only_and_validated(tmp_path):
    s = start_session(tmp_path, "t")
    a = s.append("note", {"text": "one"})
    s.append("decision", {"text": "two"})
    first_line = s.events_path.read_text().splitlines()[0]
    s.append("turn", {"role": "user", "text": "three"})
    assert s.events_path.read_text().splitlines()[0] == first_line
    evs = s.events()
    assert [e["kind"] for e in evs] == ["note", "decision", "turn"]
    assert evs[0]["id"] == a["id"] and evs[0]["schema_version"] == 1 and evs[0]["host"] == "test-host"


def test_bad_events_are_refused_with_file_and_line(tmp_path):
    with pytest.raises(EventError, match="kind 'gossip'"):
        make_event("gossip", {})
    with pytest.raises(EventError, match="payload"):
        validate_event({**make_event("note", {}), "payload": "x"})
    s = start_session(tmp_path, "t")
    s.append("note", {"text": "ok"})
    with open(s.events_path, "a") as fh:
        fh.write("{not json\n")
    with pytest.raises(EventError, match=r"events.jsonl:2: invalid JSON"):
        read_events(s.events_path)
