"""Near-duplicate detection for curation (training/data/dataset.py splits near-duplicates as one):
numpy MinHash by one-permutation hashing, LSH banding with candidates linear in the records, and the
exact Jaccard similarity of each candidate's shingle sets, so there are no false positives. Measured by
benchmarks/curation.py on a 200 MB export."""

from __future__ import annotations

import re

from training.data.schema import record_text

NEAR_DUP_THRESHOLD = 0.8
_MINHASH_PERMS = 64
_MINHASH_BANDS = 16
_BUCKET_ALL_PAIRS = 32  # a band bucket up to this size compares all its pairs; a larger one, a star and a chain
_WORD = re.compile(r"\w+")


def _mix(x):
    """splitmix64's finaliser over a uint64 array (wrapping): well-spread 64-bit values."""
    import numpy as np

    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _shingles(text: str, k: int = 5):
    """A record's shingles as sorted unique uint64 hashes: its word 3-grams, or, under three words, its
    character 5-grams. Each word is hashed once (crc32) and a 3-gram's hash mixes its words' in order."""
    import zlib

    import numpy as np

    low = text.lower()
    words = _WORD.findall(low)
    if len(words) >= 3:
        h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        with np.errstate(over="ignore"):
            grams = _mix(_mix(_mix(h[:-2]) + h[1:-1]) + h[2:])
        return np.unique(grams)
    flat = re.sub(r"\s+", " ", low)
    if not flat.strip():
        return np.zeros(0, dtype=np.uint64)
    grams = {flat[i:i + k] for i in range(max(1, len(flat) - k + 1))}
    h = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    with np.errstate(over="ignore"):
        return np.unique(_mix(h + np.uint64(0x9E3779B97F4A7C15)))


def _signatures(shingles) -> "tuple":
    """MinHash signatures (records x 64 bins, uint64) by one-permutation hashing: a shingle's hash (already
    mixed, ``_shingles``) picks its bin by its top 6 bits, and a bin keeps its smallest hash; the
    shingles arrive sorted, so each bin's minimum is its first entry, found by binary search (no pass
    per permutation). An empty bin borrows its next non-empty bin's value, offset by the distance
    (rotation densification, Shrivastava and Li 2014), so two records' bins agree with the probability
    MinHash gives: their Jaccard similarity. ``shingles``: a sized iterable, consumed one record at a
    time (a record's shingles are not kept). Also: which records have shingles (the others have no
    signature and no candidates)."""
    import numpy as np

    bins = _MINHASH_PERMS
    shift = np.uint64(64 - (bins.bit_length() - 1))  # 64 bins: the top 6 bits
    lows = np.arange(bins, dtype=np.uint64) << shift
    sigs = np.zeros((len(shingles), bins), dtype=np.uint64)
    has = np.zeros(len(shingles), dtype=bool)
    shingles = iter(shingles)
    nxt = np.arange(bins)
    for i, sh in enumerate(shingles):
        if not sh.size:
            continue
        has[i] = True
        first = np.searchsorted(sh, lows)  # where each bin's hashes start (sh sorted ascending)
        last = np.append(first[1:], sh.size)
        filled = first < last
        vals = np.where(filled, sh[np.minimum(first, sh.size - 1)], np.uint64(0))
        if not filled.all():  # rotation densification: the next filled bin to the right, circularly
            idx = np.flatnonzero(filled)
            pos = np.searchsorted(idx, nxt) % idx.size
            src = idx[pos]
            dist = (src - nxt) % bins
            with np.errstate(over="ignore"):
                vals = np.where(filled, vals, vals[src] + dist.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        sigs[i] = vals
    return sigs, has


def _candidates(sigs, has) -> set[tuple[int, int]]:
    """LSH banding: records that share every value of a band are candidates. A bucket of up to
    ``_BUCKET_ALL_PAIRS`` records gives all its pairs; a larger one (boilerplate shared by many) each
    member with the first and with the next, so the candidates stay linear in the records."""
    import numpy as np

    rows = _MINHASH_PERMS // _MINHASH_BANDS
    idx = np.flatnonzero(has)
    cands: set[tuple[int, int]] = set()
    if idx.size < 2:
        return cands
    for band in range(_MINHASH_BANDS):
        keys = np.ascontiguousarray(sigs[idx, band * rows:(band + 1) * rows]).view(np.dtype((np.void, 8 * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        starts = np.flatnonzero(np.concatenate(([True], sk[1:] != sk[:-1])))
        ends = np.append(starts[1:], sk.size)
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            members = sorted(int(x) for x in idx[order[s:e]])
            if len(members) <= _BUCKET_ALL_PAIRS:
                cands.update((members[x], members[y]) for x in range(len(members)) for y in range(x + 1, len(members)))
            else:
                cands.update((members[0], m) for m in members[1:])
                cands.update(zip(members, members[1:]))
    return cands


def near_duplicate_pairs(records: list[dict], threshold: float = NEAR_DUP_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of records whose word-3-gram sets overlap at least ``threshold``.

    MinHash (one-permutation hashing into 64 bins, numpy) with LSH banding (16 bands of 4) finds
    candidates, linear in the records; each candidate is confirmed with the exact Jaccard similarity of the two shingle sets, so
    there are no false positives (benchmarks/curation.py measures it on a 200 MB export).
    """
    import numpy as np

    class Lazy:  # each record's shingles made once for its signature, then dropped (memory: the signatures)
        def __len__(self):
            return len(records)

        def __iter__(self):
            return (_shingles(record_text(r)) for r in records)

    sigs, has = _signatures(Lazy())
    kept: dict[int, object] = {}  # the shingles of records in candidate pairs, made again, the last 2048 kept

    def sh(i: int):
        if i not in kept:
            if len(kept) >= 2048:
                kept.pop(next(iter(kept)))
            kept[i] = _shingles(record_text(records[i]))
        return kept[i]

    out = []
    for i, j in sorted(_candidates(sigs, has)):
        a, b = sh(i), sh(j)
        inter = np.intersect1d(a, b, assume_unique=True).size
        jac = inter / (a.size + b.size - inter)
        if jac >= threshold:
            out.append((i, j, round(jac, 3)))
    return out


