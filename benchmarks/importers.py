"""Import throughput and memory (issue 14): a generated ChatGPT export of 200 MB, streamed.

    python -m benchmarks.importers [--mb 200] [--small-mb 20] [--reps 1]

The export is built from the conversations of tests/fixtures/exports/chatgpt_conversations.json
(branches, reasoning, tools, citations, images), each copy with its own ids and text. Each import
runs in its own process (`duet data import` code: training.data.importers.import_to) and reports its
wall time and peak RSS; side by side, in the same run: the same import of a 10x smaller export
(bounded memory means the same peak), and a plain `json.load` of the big file (what an importer
that reads the whole export holds). Writes benchmarks/results/importers-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_machine

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "tests" / "fixtures" / "exports" / "chatgpt_conversations.json"
GOAL_RSS_GROWTH = 1.25  # peak RSS at 10x the export size / peak RSS at 1x


def generate(path: Path, mb: float) -> int:
    """Write a ChatGPT export of about ``mb`` MB; the number of conversations."""
    templates = [(c["conversation_id"], json.dumps(c, ensure_ascii=False)) for c in json.loads(TEMPLATES.read_text())]
    target = int(mb * 1e6)
    n = size = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("[")
        while size < target:
            cid, text = templates[n % len(templates)]
            new = f"bench-{n:07d}"
            item = text.replace(cid, new).replace("Question ", f"Question {n}.").replace("Why does", f"({n}) Why does")
            if n:
                fh.write(",\n")
            fh.write(item)
            size += len(item.encode("utf-8")) + 2
            n += 1
        fh.write("]\n")
    return n


_IMPORT = """
import json, resource, sys, time
from training.data.importers import import_to
t = time.perf_counter()
res = import_to(sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "conversations": res.conversations, "records": res.count,
                  "skipped": res.skipped_count, "changes": dict(res.changes),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
_NAIVE = """
import json, resource, sys, time
t = time.perf_counter()
data = json.load(open(sys.argv[1], encoding="utf-8"))
print(json.dumps({"wall_s": time.perf_counter() - t, "conversations": len(data),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--small-mb", type=float, default=20)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="duet-bench-import-") as tmp:
        tmp = Path(tmp)
        sizes = {}
        for label, mb in (("small", a.small_mb), ("big", a.mb)):
            path = tmp / f"conversations-{label}.json"
            t = time.perf_counter()
            n = generate(path, mb)
            sizes[label] = {"path": path, "mb": path.stat().st_size / 1e6, "conversations": n,
                            "generate_s": time.perf_counter() - t}
            print(f"generated {path.stat().st_size / 1e6:.0f} MB, {n} conversations", flush=True)
        runs = {"small": [], "big": []}
        for _ in range(a.reps):
            for label in ("small", "big"):
                r = _run(_IMPORT, str(sizes[label]["path"]), str(tmp / f"out-{label}.jsonl"))
                r["mb_per_s"] = sizes[label]["mb"] / r["wall_s"]
                r["conversations_per_s"] = r["conversations"] / r["wall_s"]
                runs[label].append(r)
                print(f"import {label}: {r['wall_s']:.1f} s, {r['mb_per_s']:.1f} MB/s, "
                      f"{r['conversations_per_s']:.0f} conversations/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        naive = _run(_NAIVE, str(sizes["big"]["path"]))
        print(f"json.load of the big export: peak RSS {naive['peak_rss_mb']:.0f} MB", flush=True)

    def med(label: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[label])
    growth = med("big", "peak_rss_mb") / med("small", "peak_rss_mb")
    doc = {"benchmark": "importers", "machine": cpu_machine(), "cpu": cpu_features(),
           "python": sys.version.split()[0], "reps": a.reps,
           "export": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in sizes.items()},
           "median": {label: {k: med(label, k) for k in ("wall_s", "mb_per_s", "conversations_per_s", "peak_rss_mb")}
                      for label in runs},
           "runs": runs, "json_load_big": naive,
           "peak_rss_growth_10x": growth,
           "peak_rss_ratio_duet_to_json_load": med("big", "peak_rss_mb") / naive["peak_rss_mb"],
           "goal": f"peak RSS at {a.mb:.0f} MB within {GOAL_RSS_GROWTH}x of the peak at {a.small_mb:.0f} MB",
           "meets_goal": growth <= GOAL_RSS_GROWTH}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"importers-{doc['machine']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
