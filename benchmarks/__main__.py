"""`python -m benchmarks` (`make bench`): every benchmark on this machine, then the results table.

    python -m benchmarks [--quick] [--table-only]

Runs, each in its own process: speed (duet's plan vs TRL defaults and hand-written fp32/bf16 scripts),
trl_compare (duet's executor vs a plain TRL script with the same config: overhead_ratio), scheduling
(submit -> first step and a sweep's wall time with 1 vs 2 executors),
memory, alerting, failover; vram_planner on CPU; thread_step (a LoRA step in the main thread vs a background
thread); importers (a 200 MB ChatGPT export); export (SmolLM2 to GGUF f16/q8_0); dashboard (a run page
with 10k steps of history in headless chromium, and a step's way to the open chart); data_parallel
(tokens/s of one run over 1 vs 2 Ray Train workers). Results land in benchmarks/results/<name>-<machine>.json;
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
    ("speed", ["--reps", "5", "--steps", "8"], ["--reps", "1", "--steps", "4"]),
    ("trl_compare", ["--reps", "5", "--steps", "20"], ["--reps", "1", "--steps", "12"]),
    ("serve", ["--reps", "3"], ["--reps", "1", "--max-new", "16"]),
    ("trackers", ["--reps", "3"], ["--reps", "1", "--steps", "6"]),
    ("memory", ["--reps", "3"], ["--reps", "1"]),
    ("alerting", ["--reps", "5"], ["--reps", "2"]),
    ("failover", ["--reps", "3"], ["--reps", "1"]),
    ("vram_planner", ["--device", "cpu"], ["--device", "cpu"]),
    ("thread_step", ["--reps", "7"], ["--reps", "2"]),
    ("importers", ["--reps", "3"], ["--reps", "1", "--mb", "40", "--small-mb", "4"]),
    ("export", ["--reps", "3"], ["--reps", "1"]),
    ("scheduling", ["--reps", "2"], ["--reps", "1", "--steps", "40"]),  # --steps 120,400 by default
    ("dashboard", ["--reps", "5"], ["--reps", "2", "--history", "300"]),  # --history 10000 by default
    ("data_parallel", ["--reps", "3", "--steps", "150"], ["--reps", "1", "--steps", "30"]),
    ("soak", [], ["--steps", "2000", "--from-step", "500"]),  # --steps 20000 by default
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
            st = o["step_s"]
            base = "trl_duet_kernels" if "trl_duet_kernels" in st else "plain_trl"  # older results: the same arm
            out.append(("overhead_ratio (duet's executor step time / a TRL script with duet's CPU kernels, same config)",
                        _fmt(o["overhead_ratio"]), "<= 1.03", o["meets_goal"]))
            out.append((f"step time TRL script with duet's kernels / duet, s, median [min-max] over {len(st['duet']['reps'])} alternating reps",
                        " / ".join(f"{st[k]['median']:.2f} [{st[k]['min']:.2f}-{st[k]['max']:.2f}]" for k in (base, "duet")),
                        "", None))
    elif name == "speed":
        sm, ra, go = doc["summary"], doc["ratios"], doc["goals"]
        out.append((f"tokens/s, median [min-max] over {len(sm[next(iter(sm))]['tokens_per_s']['reps'])} alternating reps "
                    f"({doc['steps']} steps x {doc['examples_per_step']} examples each): "
                    + ", ".join(sm), " / ".join(f"{v['tokens_per_s']['median']:.0f} [{v['tokens_per_s']['min']:.0f}-"
                                              f"{v['tokens_per_s']['max']:.0f}]" for v in sm.values()), "", None))
        labels = {"fp32_script": (">= 1.3", "tokens_per_s_vs_fp32_script"),
                  "bf16_script": (">= 1.0", "tokens_per_s_vs_bf16_script"), "trl_defaults": ("", None)}
        for base, (goal, key) in labels.items():
            r = ra.get(f"duet_over_{base}")
            if r:
                out.append((f"{'`duet run`' if doc.get('duet_arm') == 'duet run' else 'duet plan'} / {base} tokens/s, per rep: median [min-max]",
                            f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]", goal,
                            go[key]["met"] if key in go else None))
        out.append((f"eval loss after equal examples, median [min-max]: " + ", ".join(sm),
                    " / ".join(f"{v['eval_loss']['median']:.3f} [{v['eval_loss']['min']:.3f}-{v['eval_loss']['max']:.3f}]"
                               for v in sm.values()), "", None))
        if "eval_loss_minus_fp32_script" in go:
            g = go["eval_loss_minus_fp32_script"]
            out.append(("eval loss: duet plan minus fp32_script (medians)", f"{g['value']:+.3f}", "<= +0.03", g["met"]))
    elif name == "serve":
        sm, ra = doc["summary"], doc["ratios"]
        for key, label in (("tokens_per_s", "tokens/s"), ("ttft_s", "time to first token, s")):
            ratio = ra["tokens_per_s_duet_over_transformers" if key == "tokens_per_s" else "ttft_duet_over_transformers"]
            out.append((f"chat answer ({doc['dtype']}, greedy, {doc['max_new_tokens']} tokens): {label}, duet's chat server / "
                        "transformers' generate, medians (ratio)",
                        f"{sm['duet'][key]['median']:.3g} / {sm['transformers'][key]['median']:.3g} ({ratio:.2f})",
                        ">= 0.95" if key == "tokens_per_s" else "", ratio >= 0.95 if key == "tokens_per_s" else None))
        if "estimate_over_measured" in doc.get("memory", {}):
            r = doc["memory"]["estimate_over_measured"]
            out.append(("serving: inference estimate / measured peak RSS growth (load and first answer)", _fmt(r),
                        "within 10 %", abs(1 - r) <= 0.10))
    elif name == "trackers":
        med = doc["tokens_per_s_median"]
        out.append((f"tokens/s, median of {len(doc['runs']['none'])} alternating reps: no tracker / MLflow up / MLflow down",
                    " / ".join(f"{med[k]:.0f}" for k in ("none", "mlflow_up", "mlflow_down")), "", None))
        for key, label in (("mlflow_up_over_none", "MLflow up"), ("mlflow_down_over_none", "MLflow down all run")):
            r = doc["ratios"][key]
            out.append((f"report_to mlflow ({label}) / no tracker, tokens/s per rep: median [min-max]",
                        f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]", ">= 0.97", doc["goals"][key]["met"]))
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
    elif name == "export":
        s, mb = doc["summary"], doc["model_safetensors_bytes"] / 2**20
        for q in ("f16", "q8_0"):
            c, j = s[f"convert-{q}"], s[f"judge-{q}"]
            out.append((f"SmolLM2 -> GGUF {q} by llama.cpp's converter / llama.cpp's check: seconds (median of "
                        f"{doc['reps']}), file MiB", f"{c['seconds_median']:.1f} / {j['seconds_median']:.1f} s, "
                        f"{c['gguf_bytes'] / 2**20:.0f} MiB", "", None))
            out.append((f"GGUF {q} converter's peak RSS / the model's {mb:.0f} MiB",
                        f"{c['peak_rss_bytes'] / 2**20:.0f} MiB ({c['peak_over_model']:.2f})", "< 1.5",
                        c["peak_over_model"] < 1.5))
            v = j["verdict"]
            out.append((f"GGUF {q} in llama.cpp: top-1 agreement, greedy tokens equal (3 prompts x 20)",
                        f"{v['top1_agreement']:.3f}, {v['greedy_equal']}", "", None))
    elif name == "export-writer-vs-converter":
        a = doc["arms"]
        for q in ("f16", "q8_0"):
            w, c = a[f"duet-{q}"], a[f"converter-{q}"]
            out.append((f"SmolLM2 -> GGUF {q}: duet's former writer / llama.cpp's converter, seconds and peak RSS MiB",
                        f"{w['seconds']:.1f} / {c['seconds']:.1f} s, {w['peak_rss_bytes'] / 2**20:.0f} / "
                        f"{c['peak_rss_bytes'] / 2**20:.0f} MiB", "", None))
            out.append((f"GGUF {q} loads in llama.cpp and agrees: duet's former writer / the converter",
                        f"{'yes' if w['llama_cpp']['agrees'] else 'no'} / {'yes' if c['llama_cpp']['agrees'] else 'no'}",
                        "the converter: yes", c["llama_cpp"]["agrees"]))
    elif name == "scheduling":
        o, q = doc["submit_to_first_step_s"], doc["queued_to_dispatched_s"]
        for n, w in doc["sweep_wall_s"].items():
            sp = doc["sweep_speedup"][n]
            out.append((f"sweep of 4 equal runs ({n} steps each), wall s: 1 executor / 2 executors",
                        f"{w['1_executor']:.0f} / {w['2_executors']:.0f} s", "", None))
            out.append((f"sweep speedup, 2 executors over 1 ({n} steps)", _fmt(sp), "near 2", sp >= 1.6))
        out.append(("submit -> first step, s (median, warm): 1 executor / 2 executors",
                    f"{o['1_executor']:.1f} / {o['2_executors']:.1f} s", "", None))
        out.append(("queued -> dispatched by the scheduler, s (median): 1 / 2 executors",
                    f"{q['1_executor']:.2f} / {q['2_executors']:.2f} s", "", None))
    elif name == "dashboard":
        pl, st, g = doc["page_load_ms"], doc["step_to_chart_ms"], doc["goals"]
        n = doc["run"]["logged_steps_when_measured"]
        out.append((f"run page with {n} logged steps: navigation -> history drawn, ms, median [min-max] over {pl['n']} loads",
                    f"{pl['median']:.0f} [{pl['min']:.0f}-{pl['max']:.0f}]", "< 1000 ms", g["page_load_under_1s"]["met"]))
        out.append((f"a step's way to the open chart (executor log -> chart), ms, median [p90, max] over {st['n']} steps",
                    f"{st['median']:.0f} [{st['p90']:.0f}, {st['max']:.0f}]", "median < 1000 ms",
                    g["step_to_chart_median_under_1s"]["met"]))
    elif name == "soak":
        run, g = doc["run"], doc["goals"]
        for who, what in (("executor", "the executor (it trains the run)"), ("dashboard", "the dashboard's server"),
                          ("watch", "`duet watch`")):
            r = doc["rss"][who]
            if r.get("growth_pct") is None:
                continue
            out.append((f"{run['max_steps']}-step tiny run, stream and `duet watch` following: RSS of {what}, step "
                        f"{r['from_step']} -> {r['to_step']}", f"{r['from_mib']:.0f} -> {r['to_mib']:.0f} MiB "
                        f"({r['growth_pct']:+.1f} %)", "< 5 % growth", g[f"{who}_growth_under_5pct"]["met"]))
    elif name == "data_parallel":
        m, r = doc["median_tokens_per_s"], doc["ratio_2_over_1"]
        out.append((f"{doc['model']}, {doc['steps']} steps, global batch {doc['global_batch']}: tokens/s 1 worker / 2 workers "
                    f"(Ray Train, gloo), median of {len(r['reps'])} alternating reps", f"{m['1_worker']:.0f} / {m['2_workers']:.0f}",
                    "", None))
        out.append(("2 workers / 1 worker tokens/s, per rep: median [min-max] (the cores are shared: 1.0 means the "
                    "coordination costs nothing)", f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]", "", None))
        p = doc.get("plain_trl")
        if p:
            pm, ps, pt = p["median_tokens_per_s"], p["duet_over_plain_step_s"], p["duet_over_plain_tokens_per_s"]
            out.append((f"plain TRL script ({doc['reps']['1_worker'][0]['dtype']}), same plan: tokens/s 1 process / torchrun 2 processes "
                        f"(ratio {p['ratio_2_over_1']['median']:.2f})", f"{pm['1_process']:.0f} / {pm['2_processes_torchrun']:.0f}",
                        "", None))
            out.append(("duet / plain TRL, median step seconds (tokens/s): 1 worker vs 1 process; 2 workers vs torchrun 2",
                        f"{ps['1_worker']:.2f} ({pt['1_worker']:.2f}); {ps['2_workers']:.2f} ({pt['2_workers']:.2f})", "", None))
            d = p["max_loss_diff_vs_duet"]
            out.append(("largest per-step loss difference, duet vs plain TRL (1 process; torchrun 2)",
                        f"{d['1_process']:.2g}; {d['2_processes_torchrun']:.2g}", "", None))
    elif name == "thread_step":
        r, w, c = doc["thread_over_main"], doc["median_wall_s"], doc["median_process_cpu_s"]
        out.append((f"LoRA step ({doc.get('dtype', 'bf16')}) in a background thread / the main thread, wall, over "
                    f"{len(r['reps'])} alternating reps (the executor trained in one before it gave each run a process)", f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]", "", None))
        out.append(("step wall / process CPU seconds, main vs thread (medians)",
                    f"{w['main']:.2f} / {c['main']:.2f} vs {w['thread']:.2f} / {c['thread']:.2f}", "", None))
        if "thread_set_over_main" in doc:
            s = doc["thread_set_over_main"]
            out.append(("the same in a background thread that sets torch's thread count itself / the main thread",
                        f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]", "", None))
    elif name == "vram_planner":
        ratios = [r["ratio_estimate_to_measured"] for r in doc.get("rows", []) if r.get("ratio_estimate_to_measured")]
        if ratios:
            worst = max(ratios, key=lambda r: abs(1 - r))
            ok = all(abs(1 - r) <= 0.10 for r in ratios)
            out.append((f"planner estimate / measured ({doc.get('device')}, {len(ratios)} configs), worst",
                        _fmt(worst), "within 10 %", ok))
            under = min(ratios)
            out.append(("planner estimate / measured, lowest (an estimate below the peak is the side that OOMs)",
                        _fmt(under), ">= 0.9", under >= 0.9))
        judged = [r for r in doc.get("rows", []) if "budget_bytes" in r]
        if judged:  # a verdict against the machine's real budget, beside what happened
            wrong = [r for r in judged if r["fits"] == bool(r.get("oom"))]
            out.append((f"plan verdicts against this machine's real budget that were wrong ({len(judged)} configs)",
                        str(len(wrong)), "0", not wrong))
    return out


def machine_label(doc: dict) -> str:
    """The machine a row holds for: its name, and for CPU results the CPU's model and kind (AMX,
    AVX512-BF16, AVX-512, AVX2), which decide the dtype the plan trains in."""
    from benchmarks import cpu_kind

    name, cpu = doc.get("machine", "?"), doc.get("cpu")
    if not isinstance(cpu, dict) or not str(name).startswith("cpu-"):
        return str(name)
    cap = (doc.get("isa_cap") or {}).get("isa")  # benchmarks.speed --isa-cap: a stand-in for a CPU of that kind
    return f"{name} ({cpu.get('model', '?')}, {cpu_kind(cpu)}{f' capped to {cap} by env, a stand-in for {cap}' if cap else ''})"


def write_table() -> Path:
    lines = ["# Benchmark results", "",
             "Rebuilt by `make bench` (`python -m benchmarks`) from the JSON files in this folder. Each row names the",
             "machine it was measured on; CPU rows come from 2-core development machines (the CPU's model and kind",
             "where the result records it: amx, avx512bf16, avx512, avx2), GPU rows from lent devices (see each JSON",
             "for versions and every repetition).", "",
             "| benchmark | machine | figure | value | goal | met |", "|---|---|---|---|---|---|"]
    for p in sorted(RESULTS.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            continue
        for fig, val, goal, met in rows_of(doc):
            mark = "" if met is None else ("yes" if met else "**no**")
            lines.append(f"| [{doc.get('benchmark')}]({p.name}) | {machine_label(doc)} | {fig} | {val} | {goal} | {mark} |")
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
