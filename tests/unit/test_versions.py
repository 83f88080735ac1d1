"""Dataset versions as `duet data versions|show|diff` and the dashboard show them (training/data/versions.py)."""

import json

import pytest

from training.data import versions
from training.data.curate import build_version
from training.data.schema import DatasetError


@pytest.fixture
def two_versions(tmp_path, repo_root):
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    a = tmp_path / "a.jsonl"
    a.write_text("\n".join(lines) + "\n")
    changed = dict(recs[1], messages=recs[1]["messages"][:-1] + [{"role": "assistant", "content": "a new answer"}])
    added = dict(recs[2], id="maya-new", messages=[{"role": "user", "content": "What is new?"},
                                                    {"role": "assistant", "content": "This record."}])
    bad = ['{"id": "no-messages"}', '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
           json.dumps(dict(recs[3], id="bad-category", metadata={"category": "gossip"}))]
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join([json.dumps(changed), json.dumps(added)] + lines[2:] + bad) + "\n")
    va = build_version([a], tmp_path / "ws" / "datasets", "persona", strict=False)
    vb = build_version([b], tmp_path / "ws" / "datasets", "persona", strict=False)
    return tmp_path / "ws", va, vb


def test_list_resolve_and_overview(two_versions):
    ws, va, vb = two_versions
    listed = versions.list_versions(ws)
    assert {v["hash"] for v in listed} == {va.content_hash[:12], vb.content_hash[:12]}
    assert versions.resolve(ws, f"persona@{va.content_hash[:6]}") == va.path
    with pytest.raises(DatasetError, match="unknown"):
        versions.resolve(ws, "persona@ffffffffffff0")
    with pytest.raises(DatasetError, match="no dataset"):
        versions.resolve(ws, "other")
    with pytest.raises(DatasetError):
        versions.resolve(ws, "../persona")
    doc = versions.overview(vb.path)
    c = doc["manifest"]["counts"]
    assert sum(doc["tokens"]["histogram"]["counts"]) == c["train"] + c["test"]
    reasons = {p["message"] for q in doc["quarantine"] for p in q["problems"]}
    assert len(doc["quarantine"]) == c["quarantine"] == 3
    assert any("missing" in r for r in reasons) and any("'gossip' is not one of" in r for r in reasons)
    assert all(q["line"] for q in doc["quarantine"])
    assert doc["spot_check"] and doc["reasoning"]["reasoning"] + doc["reasoning"]["direct"] == c["train"] + c["test"]


def test_diff_names_what_changed(two_versions):
    ws, va, vb = two_versions
    d = versions.diff(va.path, vb.path)
    assert d["added"] == ["maya-new"] and d["removed"] == ["maya-001"] and d["changed"] == ["maya-002"]
    n_a = va.manifest["counts"]["train"] + va.manifest["counts"]["test"]
    assert d["counts"] == {"added": 1, "removed": 1, "changed": 1, "moved": len(d["moved"]), "unchanged": n_a - 2}
    assert all(m["from"] != m["to"] for m in d["moved"])
    same = versions.diff(va.path, va.path)
    assert same["counts"] == {"added": 0, "removed": 0, "changed": 0, "moved": 0, "unchanged": va.manifest["counts"]["train"]
                              + va.manifest["counts"]["test"]}


def test_histogram():
    assert versions.histogram([]) == {"edges": [], "counts": []}
    h = versions.histogram([5, 5, 5])
    assert h["counts"] == [3] and h["edges"] == [5, 6]
    h = versions.histogram(list(range(100)), bins=10)
    assert h["counts"] == [10] * 10 and h["edges"][0] == 0 and h["edges"][-1] == 100
