import json

import pytest

from training.data.schema import DatasetError, check_records, read_jsonl, scan_jsonl
from training.data.curate import build_version
from training.data.dataset import conversation_key, load_split, verify_version


def test_bundled_persona_examples_are_valid_and_balanced(repo_root):
    recs = read_jsonl(repo_root / "examples/persona/persona.jsonl")
    assert len(recs) >= 55
    assert check_records(recs) == []
    cats = {r.data["metadata"]["category"] for r in recs}
    assert cats == {"style", "facts", "decisions"}
    reasoning = sum("<think>" in r.data["messages"][-1]["content"] for r in recs)
    assert abs(reasoning - len(recs) / 2) <= 3


DAMAGED = [
    ('{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "<line>", "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "id", "missing"),
    ('{"id": "c", "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', "messages[0].role", "robot"),
    ('{"id": "d", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "yo"}]}', "messages[1].role", "only first"),
    ('{"id": "e", "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "yo"}]}', "messages[0].content", "empty"),
    ('{"id": "f", "messages": [{"role": "user", "content": "hi"}]}', "messages", "end with an assistant"),
    ('{"id": "g", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x"}]}', "messages[1].content", "unbalanced"),
    ('{"id": "h", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "metadata": {"category": "gossip"}}', "metadata.category", "gossip"),
    ('{"id": "i", "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}', "messages[0].content", "string"),
    ('[1, 2]', "<line>", "not an object"),
]


def test_check_reports_every_problem_with_file_line_and_field(tmp_path):
    good = '{"id": "ok", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    lines = [good] + [d[0] for d in DAMAGED] + [good.replace('"ok"', '"ok"')]  # last: duplicate id
    f = tmp_path / "bad.jsonl"
    f.write_bytes(("\n".join(lines) + "\n").encode() + b'{"id": "z", "messages": "\xff\xfe"}\n')
    with pytest.raises(DatasetError, match="refused whole") as refused:
        read_jsonl(f)
    assert {p.line for p in refused.value.problems} == {2, len(DAMAGED) + 1, len(DAMAGED) + 3}
    records, line_problems = scan_jsonl(f)  # what `duet data check` reports: every problem at once
    problems = line_problems + check_records(records)
    by_line = {p.line: p for p in problems}
    for i, (_, field, words) in enumerate(DAMAGED, start=2):
        assert i in by_line, f"line {i} not reported"
        assert any(p.field == field and words in p.message for p in problems if p.line == i), (i, by_line[i])
    dup_line = len(DAMAGED) + 2
    assert any(p.line == dup_line and p.field == "id" and "duplicate" in p.message for p in problems)
    assert any(p.line == dup_line + 1 and "UTF-8" in p.message for p in problems)
    assert all(str(f) in str(p) for p in problems)


def test_version_is_deterministic_leakage_free_and_stratified(repo_root, tmp_path):
    src = repo_root / "examples/persona/persona.jsonl"
    a = build_version([src], tmp_path / "a", "persona", test_frac=0.1, seed=3)
    b = build_version([src], tmp_path / "b", "persona", test_frac=0.1, seed=3)
    assert a.content_hash == b.content_hash
    assert a.path.name == a.content_hash[:12]
    train, test = load_split(a.path, "train"), load_split(a.path, "test")
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert {conversation_key(r) for r in train}.isdisjoint({conversation_key(r) for r in test})
    assert {r["metadata"]["category"] for r in test} == {"style", "facts", "decisions"}
    m = a.manifest
    assert m["counts"]["train"] + m["counts"]["test"] + m["counts"]["quarantine"] == m["counts"]["input"]
    assert verify_version(a.path)["content_hash"] == a.content_hash
    c = build_version([src], tmp_path / "c", "persona", test_frac=0.1, seed=4)
    assert c.content_hash != a.content_hash


def test_duplicate_conversations_stay_on_one_side(tmp_path, repo_root):
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()
    dup = json.loads(lines[0])
    dup["id"] = "copy-of-first"
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines + [json.dumps(dup)]) + "\n")
    v = build_version([f], tmp_path / "out", "d")
    assert v.manifest["duplicates"] == [{"id": "copy-of-first", "duplicate_of": json.loads(lines[0])["id"]}]


def test_strict_build_writes_nothing_on_bad_input(tmp_path, repo_root):
    lines = (repo_root / "examples/persona/persona.jsonl").read_text().splitlines()
    lines[7] = lines[7][:-5]  # truncate a line: invalid JSON on line 8
    f = tmp_path / "broken.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as ei:
        build_version([f], tmp_path / "ds", "persona", strict=True)
    assert any(p.line == 8 and p.file == str(f) for p in ei.value.problems)
    assert not (tmp_path / "ds" / "persona").exists() or not any((tmp_path / "ds" / "persona").iterdir())


def test_tampered_version_is_detected(tmp_path, repo_root):
    v = build_version([repo_root / "examples/persona/persona.jsonl"], tmp_path, "p")
    with open(v.path / "train.jsonl", "a") as fh:
        fh.write("{}\n")
    with pytest.raises(DatasetError, match="does not match"):
        verify_version(v.path)


_PEAK = """
import json, random, resource, sys
from pathlib import Path
n, tmp = int(sys.argv[1]), Path(sys.argv[2])
rng, vocab = random.Random(n), [f"w{i}" for i in range(20000)]
with open(tmp / "in.jsonl", "w") as fh:
    for i in range(n):
        text = " ".join(rng.choice(vocab) for _ in range(1500))
        fh.write(json.dumps({"id": f"r{i:06d}", "messages": [{"role": "user", "content": f"q{i}"},
                                                            {"role": "assistant", "content": text}]}) + "\\n")
from training.data.curate import build_version
import numpy  # noqa: F401  (in the baseline: curation loads it)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
v = build_version([tmp / "in.jsonl"], tmp / "out", "m")
print(json.dumps({"bytes": (tmp / "in.jsonl").stat().st_size, "train": v.manifest["counts"]["train"],
                  "growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base}))
"""


def test_curation_memory_stays_flat_as_the_data_grows(tmp_path, repo_root):
    """Two passes (training/data/curate.py): the records live in a scratch file, not in memory, so ten
    megabytes more data add a small fraction of that to the peak (holding the records took about twice it)."""
    import subprocess
    import sys

    runs = []
    for n in (200, 1000):
        (tmp_path / str(n)).mkdir()
        r = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(tmp_path / str(n))], capture_output=True, text=True,
                           cwd=repo_root, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    data_growth_kb = (runs[1]["bytes"] - runs[0]["bytes"]) / 1024
    assert runs[1]["train"] > 800 and data_growth_kb > 7000
    assert runs[1]["growth_kb"] - runs[0]["growth_kb"] < 0.25 * data_growth_kb, runs
