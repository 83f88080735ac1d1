"""Curation at scale (issue 37): a generated 200 MB ChatGPT export imported and curated, each step in its
own process, timed, with its peak RSS; and the same for a 10x smaller export, so memory growth shows.

    python -m benchmarks.curation [--mb 200] [--small-mb 20]

The export is benchmarks/importers.py's (copies of the fixture conversations with their own ids and
numbers: many near-duplicates of each other, the hard case for near-duplicate detection). Curation is
``duet data curate``'s code (training.data.curate.build_version, not strict: bad records are
quarantined): checks, exact and near-duplicate detection (numpy one-permutation MinHash, LSH banding,
exact Jaccard on the candidates), the split, token estimates, the version written. Goal on this
machine: import + curate of the 200 MB export under 60 s. Writes
benchmarks/results/curation-<machine>.json with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_machine
from benchmarks.importers import generate

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 60.0

_IMPORT = """
import json, resource, sys, time
from training.data.importers import import_to
t = time.perf_counter()
res = import_to(sys.argv[1], sys.argv[2])
print(json.dumps({"wall_s": time.perf_counter() - t, "conversations": res.conversations, "records": res.count,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
_CURATE = """
import json, resource, sys, time
from training.data import curate
t = time.perf_counter()
marks = {}
real = curate.near_duplicate_pairs
def timed(records, *a, **k):
    t0 = time.perf_counter()
    out = real(records, *a, **k)
    marks["near_duplicates_s"] = time.perf_counter() - t0
    marks["records_compared"] = len(records)
    return out
curate.near_duplicate_pairs = timed
v = curate.build_version([sys.argv[1]], sys.argv[2], "bench", strict=False)
c = v.manifest["counts"]
print(json.dumps({"wall_s": time.perf_counter() - t, **marks, "counts": c,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--small-mb", type=float, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="duet-bench-curation-") as tmp:
        tmp = Path(tmp)
        for label, mb in (("small", a.small_mb), ("big", a.mb)):
            export = tmp / f"conversations-{label}.json"
            n = generate(export, mb)
            records = tmp / f"{label}.jsonl"
            imp = _run(_IMPORT, str(export), str(records))
            cur = _run(_CURATE, str(records), str(tmp / f"datasets-{label}"))
            rows[label] = {"export_mb": round(export.stat().st_size / 1e6, 1), "conversations": n,
                           "records_mb": round(records.stat().st_size / 1e6, 1), "import": imp, "curate": cur,
                           "import_and_curate_s": round(imp["wall_s"] + cur["wall_s"], 2)}
            print(json.dumps({label: rows[label]}), flush=True)
    big, small = rows["big"], rows["small"]
    doc = {"benchmark": "curation", "machine": cpu_machine(), "cpu": cpu_features(), "python": sys.version.split()[0],
           "rows": rows,
           "curate_peak_rss_growth": round(big["curate"]["peak_rss_mb"] / small["curate"]["peak_rss_mb"], 2),
           "data_growth": round(big["records_mb"] / max(small["records_mb"], 1e-9), 2),
           "near_duplicates_ms_per_record": round(1000 * big["curate"]["near_duplicates_s"]
                                                   / max(1, big["curate"]["records_compared"]), 3),
           "goal": f"import + curate of the {a.mb:.0f} MB export under {GOAL_S:.0f} s",
           "meets_goal": big["import_and_curate_s"] < GOAL_S}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"curation-{doc['machine']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0 if doc["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
