"""`python -m benchmarks` (`make bench`): every benchmark on this machine, then the results table.

    python -m benchmarks [--quick] [--table-only]

Runs, each in its own process: trl_compare (duet vs plain TRL: overhead_ratio, planner_speedup_ratio),
memory, alerting, failover; vram_planner on CPU; importers (a 200 MB ChatGPT export). Results land in benchmarks/results/<name>-<machine>.json;
benchmarks/results/README.md is rebuilt from every JSON there (GPU results committed from lent
devices included), each row naming the machine it came from. --table-only rebuilds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUITE = [
    ("trl_compare", ["--reps", "2", "--steps", "20"], ["--reps", "1", "--steps", "12"]),
    ("memory", ["--reps", "3"], ["--reps", "1"]),
    ("alerting", ["--reps", "5"], ["--reps", "2"]),
    ("failover", ["--reps", "3"], ["--reps", "1"]),
    ("vram_planner", ["--device", "cpu"], ["--device", "cpu"]),
    ("importers", ["--reps", "3"], ["--reps", "1", "--mb", "40", "--small-mb", "4"]),
]


def _fmt(v, unit="") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def rows_of(doc: dict) -> list[tuple[str, str, str, str]]:
    """(figure, value, goal, met) rows for one result document."""
    name = doc.get("benchmark")
    out = []
    if name == "trl_compare":
        if "overhead" in doc:
            o = doc["overhead"]
            out.append(("overhead_ratio (duet step time / plain TRL)", _fmt(o["overhead_ratio"]), "<= 1.03", o["meets_goal"]))
            out.append(("step time plain TRL / duet (s, median)", f"{_fmt(o['step_s']['plain_trl']['median'])} / "
                        f"{_fmt(o['step_s']['duet']['median'])}", "", None))
        if "planner" in doc:
            p = doc["planner"]
            out.append(("planner_speedup_ratio (duet plan tokens/s / TRL defaults)", _fmt(p["planner_speedup_ratio"]),
                        ">= 1.3 (CPU)", p["meets_goal"]))
            out.append(("tokens/s TRL defaults / duet plan", f"{_fmt(p['trl_defaults']['tokens_per_s'])} / "
                        f"{_fmt(p['duet_plan']['tokens_per_s'])}", "", None))
            rss = p.get("peak_train_rss_ratio", p["peak_rss_ratio"])
            out.append(("peak RSS ratio during training (duet plan / TRL defaults)", _fmt(rss), "<= 1", rss <= 1))
            delta = p.get("eval_loss_delta")
            out.append(("eval loss TRL defaults / duet plan (same eval for both)",
                        f"{p['trl_defaults']['eval_loss']} / {p['duet_plan']['eval_loss']}"
                        + (f" (delta {delta:+.3f})" if delta is not None else ""), "equal or lower, within noise", None))
    elif name == "memory":
        for k, goal in doc["goals_s"].items():
            out.append((k, _fmt(doc["median"][k], " s"), f"<= {goal} s", doc["meets_goal"][k]))
    elif name == "alerting":
        t, w, e = doc["threshold_to_webhook_s"], doc["watchdog_latency_s"], doc["exporter_overhead"]
        out.append(("threshold -> webhook (Prometheus + Alertmanager), median", _fmt(t["median"], " s"), "<= 2 s", t["meets_goal"]))
        out.append(("in-process watchdog latency, max", _fmt(w["max"], " s"), "<= 1 s", w["meets_goal"]))
        out.append(("exporter on / off step time", _fmt(e["ratio_on_off"]), "< 1.01", e["meets_goal"]))
    elif name == "failover":
        out.append(("failover: node back -> training again, median", _fmt(doc["median_failover_s"], " s"), "< 10 s",
                    doc["meets_goal"]))
        if "median_from_command_s" in doc:
            out.append(("failover from `duet node start`, median", _fmt(doc["median_from_command_s"], " s"), "", None))
    elif name == "importers":
        big, small = doc["median"]["big"], doc["median"]["small"]
        mb = doc["export"]["big"]["mb"]
        out.append((f"import of a {mb:.0f} MB ChatGPT export: conversations/s, MB/s",
                    f"{big['conversations_per_s']:.0f} /s, {big['mb_per_s']:.1f} MB/s", "", None))
        out.append((f"peak RSS at {mb:.0f} MB / at {doc['export']['small']['mb']:.0f} MB (streamed)",
                    f"{big['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB", "ratio <= 1.25", doc["meets_goal"]))
        out.append(("peak RSS: duet import / plain json.load of the same file",
                    f"{doc['peak_rss_ratio_duet_to_json_load']:.2f}", "", None))
    elif name == "vram_planner":
        ratios = [r["ratio_estimate_to_measured"] for r in doc.get("rows", []) if r.get("ratio_estimate_to_measured")]
        if ratios:
            worst = max(ratios, key=lambda r: abs(1 - r))
            ok = all(abs(1 - r) <= 0.10 for r in ratios)
            out.append((f"planner estimate / measured ({doc.get('device')}, {len(ratios)} configs), worst",
                        _fmt(worst), "within 10 %", ok))
        ooms = [r for r in doc.get("rows", []) if r.get("oom") and r.get("fits", True)]
        if doc.get("rows"):
            out.append(("plans marked fits that OOMed", str(len(ooms)), "0", not ooms))
    return out


def write_table() -> Path:
    lines = ["# Benchmark results", "",
             "Rebuilt by `make bench` (`python -m benchmarks`) from the JSON files in this folder. Each row names the",
             "machine it was measured on; CPU rows come from the 2-core development machine, GPU rows from lent",
             "devices (see each JSON for versions and every repetition).", "",
             "| benchmark | machine | figure | value | goal | met |", "|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            continue
        for fig, val, goal, met in rows_of(doc):
            mark = "" if met is None else ("yes" if met else "**no**")
            lines.append(f"| [{doc.get('benchmark')}]({p.name}) | {doc.get('machine', '?')} | {fig} | {val} | {goal} | {mark} |")
    out = RESULTS / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not for the record)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--only", help="comma-separated benchmark names")
    a = ap.parse_args(argv)
    if not a.table_only:
        only = set(a.only.split(",")) if a.only else None
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(RESULTS.parents[1])}
        for name, full, quick in SUITE:
            if only and name not in only:
                continue
            t = time.time()
            print(f"== {name}", flush=True)
            r = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *(quick if a.quick else full)], env=env)
            print(f"== {name}: exit {r.returncode} in {time.time() - t:.0f} s", flush=True)
            if r.returncode != 0:
                return r.returncode
    print(f"table: {write_table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
