"""Near-duplicate detection at scale (issue 37): vectorised, candidates linear in the records, exact."""

import random
import time

from training.data.near_dups import _candidates, _shingles, _signatures, near_duplicate_pairs


def rec(i, text):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}]}


def test_edited_copies_are_found_with_their_exact_jaccard_and_strangers_are_not():
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(5000)]
    base = [" ".join(rng.choice(vocab) for _ in range(200)) for _ in range(50)]
    edited = []
    for t in base:
        w = t.split()
        w[rng.randrange(len(w))] = "changed"
        edited.append(" ".join(w))
    records = [rec(i, t) for i, t in enumerate(base + edited)]
    pairs = near_duplicate_pairs(records)
    assert {(i, j) for i, j, _ in pairs} == {(i, i + 50) for i in range(50)}
    for i, j, jac in pairs:  # exact: the shingle sets' own Jaccard
        a, b = set(_shingles(records[i]["messages"][-1]["content"]).tolist()), \
            set(_shingles(records[j]["messages"][-1]["content"]).tolist())
        assert jac == round(len(a & b) / len(a | b), 3) and jac >= 0.8


def test_a_crowd_of_near_identical_records_gives_linear_candidates_and_one_group():
    """600 copies of one boilerplate answer with a word changed each: every band puts them in one bucket;
    all pairs would be 179,700; a star and a chain per bucket keep it linear and still join them all."""
    text = " ".join(f"word{i}" for i in range(300))
    records = [rec(i, text.replace("word7 ", f"w{i} ")) for i in range(600)]
    sigs, has = _signatures([_shingles(r["messages"][-1]["content"]) for r in records])
    cands = _candidates(sigs, has)
    assert len(cands) <= 2 * 16 * 600
    pairs = near_duplicate_pairs(records)
    parent = list(range(600))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    assert len({find(i) for i in range(600)}) == 1


def test_records_without_words_have_no_candidates():
    """Text-less records (exact duplicates are another check's) are never candidates: the old version put
    every one of them in one bucket and compared all their pairs."""
    empty = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " "}]}
    records = [{**empty, "id": f"e{i}"} for i in range(300)] + [rec(1, "hello there friend"), rec(2, "hello there friend!")]
    sigs, has = _signatures([_shingles(" ".join(m["content"] for m in r["messages"])) for r in records])
    assert not has[:300].any() and has[300:].all()
    assert near_duplicate_pairs(records) == [(300, 301, 1.0)]


def test_thousands_of_long_records_take_milliseconds_each():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    records = [rec(i, " ".join(rng.choice(vocab) for _ in range(2000))) for i in range(500)]
    t = time.perf_counter()
    near_duplicate_pairs(records)
    per = (time.perf_counter() - t) / len(records)
    assert per < 0.02, per  # measured ~1-2 ms here; the pure-Python version took ~145 ms
