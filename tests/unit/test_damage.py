"""20+ kinds of damage in one file: `check` reports each with its line; `curate` loses nothing."""

import json

from cluster.cli import main


def _ok(i, cat="facts", think=False):
    ans = ("<think>recall the profile</think>\n" if think else "") + f"answer {i}: the tank {i} reads {30 + i} ppt"
    return json.dumps({"id": f"ok-{i}", "messages": [{"role": "user", "content": f"question {i} about tank {i} in the lab"},
                                                      {"role": "assistant", "content": ans}],
                       "metadata": {"category": cat}})


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}
DAMAGE = [  # (line text, field reported, words in the message)
    ('{"id": "trunc", "messages": [', "<line>", "invalid JSON"),
    (b'{"id": "bytes", "messages": "\xff"}', "<line>", "not UTF-8"),
    ('["a", "list"]', "<line>", "not an object"),
    (json.dumps({"messages": [U, A]}), "id", "missing"),
    (json.dumps({"id": 7, "messages": [U, A]}), "id", "non-empty string"),
    (json.dumps({"id": " ", "messages": [U, A]}), "id", "non-empty string"),
    (json.dumps({"id": "nomsg"}), "messages", "missing"),
    (json.dumps({"id": "msgstr", "messages": "hello"}), "messages", "non-empty list"),
    (json.dumps({"id": "msgempty", "messages": []}), "messages", "non-empty list"),
    (json.dumps({"id": "msgnotobj", "messages": ["hi", A]}), "messages[0]", "must be an object"),
    (json.dumps({"id": "role", "messages": [{"role": "moderator", "content": "x"}, U, A]}), "messages[0].role", "moderator"),
    (json.dumps({"id": "sys", "messages": [U, {"role": "system", "content": "s"}, A]}), "messages[1].role", "only first"),
    (json.dumps({"id": "ctype", "messages": [{"role": "user", "content": ["x"]}, A]}), "messages[0].content", "string"),
    (json.dumps({"id": "cempty", "messages": [U, {"role": "assistant", "content": ""}]}), "messages[1].content", "empty"),
    (json.dumps({"id": "end", "messages": [U, A, U]}), "messages", "end with an assistant"),
    (json.dumps({"id": "nouser", "messages": [{"role": "system", "content": "s"}, A]}), "messages", "at least one user"),
    (json.dumps({"id": "think", "messages": [U, {"role": "assistant", "content": "<think>hmm"}]}), "messages[1].content", "unbalanced"),
    (json.dumps({"id": "ok-1", "messages": [U, A]}), "id", "duplicate id"),
    (json.dumps({"id": "meta", "messages": [U, A], "metadata": "style"}), "metadata", "must be an object"),
    (json.dumps({"id": "cat", "messages": [U, A], "metadata": {"category": "gossip"}}), "metadata.category", "gossip"),
    (json.dumps({"id": "long", "messages": [U, {"role": "assistant", "content": "word " * 400}]}), "messages", "above the maximum sequence length 128"),
    (json.dumps({"id": "dpo", "prompt": "p?", "chosen": [A], "rejected": [A]}), "rejected", "identical to chosen"),
]


def _write(tmp_path, damage=DAMAGE):
    lines = [_ok(i, ("facts", "style", "decisions")[i % 3], think=i % 2 == 0).encode() for i in range(1, 13)]
    first_damage = len(lines) + 1
    lines += [d[0] if isinstance(d[0], bytes) else d[0].encode() for d in damage]
    f = tmp_path / "damaged.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return f, first_damage, len(lines)


def test_check_reports_every_kind_of_damage_with_its_line(tmp_path, capsys):
    f, first, _ = _write(tmp_path)
    assert main(["data", "check", str(f), "--max-len", "128", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["invalid_records"] == len(DAMAGE) >= 20
    for k, (_, field, words) in enumerate(DAMAGE):
        line = first + k
        hits = [p for p in doc["problems"] if p["line"] == line]
        assert any(p["field"] == field and words in p["message"] and p["file"] == str(f) for p in hits), (line, hits)
    assert "estimate" in doc["tokens_counted_with"]


def test_a_file_with_lines_that_are_not_json_objects_is_refused_whole(tmp_path, capsys):
    """Not UTF-8, not JSON, not an object: not the format it claims, so nothing of it is stored (the
    quarantine is for records that parsed and failed a rule)."""
    f, first, _ = _write(tmp_path)
    ws = tmp_path / "ws"
    assert main(["data", "curate", str(f), "--name", "damaged", "--workspace", str(ws), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {p["line"] for p in doc["problems"]} == {first + k for k, d in enumerate(DAMAGE) if d[1] == "<line>"}
    assert not (ws / "datasets" / "damaged").exists()


def test_curate_quarantines_with_reasons_and_counts_add_up(tmp_path, capsys):
    record_damage = [d for d in DAMAGE if d[1] != "<line>"]  # parsed, failed a rule: quarantined
    f, _, n_lines = _write(tmp_path, record_damage)
    n_damage = len(record_damage)
    ws = tmp_path / "ws"
    assert main(["data", "curate", str(f), "--name", "damaged", "--max-len", "128", "--workspace", str(ws), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    c = res["manifest"]["counts"]
    assert c["input"] == n_lines
    assert c["train"] + c["test"] + c["quarantine"] == n_lines
    assert c["quarantine"] == n_damage
    from pathlib import Path

    q = [json.loads(x) for x in (Path(res["path"]) / "quarantine.jsonl").read_text().splitlines()]
    assert all(item["problems"] and item["line"] and item["raw"] is not None for item in q)
    assert (Path(res["path"]) / "spot_check.jsonl").read_text().count("\n") >= 1
    # strict mode refuses the same input and writes nothing more
    assert main(["data", "curate", str(f), "--name", "strict", "--strict", "--workspace", str(ws)]) == 1
    assert not (ws / "datasets" / "strict").exists()


def test_curate_is_deterministic_and_flags_near_duplicates(tmp_path, capsys):
    base = [_ok(i, ("facts", "style", "decisions")[i % 3]) for i in range(1, 21)]
    near = json.loads(base[0])
    near["id"] = "near-1"
    near["messages"][1]["content"] += " indeed"
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(base + [json.dumps(near)]) + "\n")
    hashes = []
    for ws in ("a", "b"):
        assert main(["data", "curate", str(f), "--name", "d", "--seed", "5", "--workspace", str(tmp_path / ws), "--json"]) == 0
        hashes.append(json.loads(capsys.readouterr().out))
    assert hashes[0]["content_hash"] == hashes[1]["content_hash"]
    m = hashes[0]["manifest"]
    pairs = {(p["a"], p["b"]) for p in m["near_duplicates"]}
    assert ("ok-1", "near-1") in pairs or ("near-1", "ok-1") in pairs
    from pathlib import Path

    train_ids = {json.loads(x)["id"] for x in (Path(hashes[0]["path"]) / "train.jsonl").read_text().splitlines()}
    assert ("ok-1" in train_ids) == ("near-1" in train_ids)  # kept on one side of the split
    assert any("reasoning" in w for w in m["warnings"])  # 0 % reasoning vs the 50 % target
