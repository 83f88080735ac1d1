"""Scheduling over several executors: submit -> first step, and a sweep's wall time, 1 vs 2 executors.

    python -m benchmarks.scheduling [--reps 2] [--steps 120,400]

Real Ray on this machine: the head with an executor (127.0.0.2), the architect's node (127.0.0.4),
and in the second phase a second executor "gpu-b" (127.0.0.3), all through `duet node` (token auth).
Every executor trains with one torch thread, so on a machine with two cores each executor has a core
of its own, as each GPU host has its own GPU. The driver is this process, as `duet run` / `duet
sweep` would be.

- overhead: a tiny run of 4 steps through run_on_cluster (curate, plan for every executor, queue,
  dispatch, train): queued -> dispatched (the scheduler), dispatched -> first step (the executor:
  model load, dataset, the eval before training) and submit -> first step, the sum with planning.
  One run before the measured ones warms the executors (the tiny model is built once a host).
- sweep: 4 equal runs (a learning-rate grid; the cost of a run does not depend on its learning rate)
  with --max-parallel 2, for each --steps length. Phase 1 has one executor (the runs go one after
  the other), phase 2 two. The figure is wall(1 executor) / wall(2 executors); the goal is near 2.
  A run's fixed part (eval before and after, merge, samples, the record) does not shrink with its
  steps, so the ratio is given for a short and a longer run.

Writes benchmarks/results/scheduling-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_machine

PORT = 6471
ADDRESS = f"127.0.0.2:{PORT}"
REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "persona" / "persona.jsonl"


def _rc(steps: int):
    from training.config import RunConfig

    return RunConfig(preset="demo", model="tiny", data=[str(DATA)], dataset="persona",
                     overrides={"max_steps": steps, "checkpoint_every": steps, "eval_every": steps,
                                "sample_prompts": 1, "max_new_tokens": 4, "micro_batch": 2})


def overhead(ws: Path) -> dict:
    from cluster.demo import run_on_cluster

    t0 = time.time()
    s = run_on_cluster(str(ws), tiny=True, data=[str(DATA)], overrides=_rc(4).overrides, address=ADDRESS,
                       title="bench overhead")
    rec = json.loads((Path(s["run_dir"]) / "run.json").read_text())
    p = rec["placement"]
    first = min(x["time"] for x in rec["losses"])
    return {"executor": p["executor"], "submit_to_first_step_s": round(first - t0, 2),
            "queued_to_dispatched_s": round(p["dispatched_at"] - p["queued_at"], 3),
            "dispatched_to_first_step_s": round(first - p["dispatched_at"], 2),
            "plan_and_queue_s": round(p["queued_at"] - t0, 2)}


def overhead_on(ws: Path, node: str) -> dict:
    from cluster.demo import run_on_cluster

    run_on_cluster(str(ws), tiny=True, data=[str(DATA)], overrides=_rc(4).overrides, address=ADDRESS,
                   title=f"bench warm-up on {node}", on=node)
    return {"warmed": node}


def sweep(ws: Path, steps: int, tag: str) -> dict:
    from cluster.demo import run_points
    from roles import sweep as sw

    rc = _rc(steps)
    points = sw.expand(sw.parse_grid(["learning_rate=1e-4,2e-4,3e-4,4e-4"]), rc.preset, rc.overrides)
    t0 = time.time()
    runs = run_points(str(ws), rc, [str(DATA)], points, f"bench-{tag}-{int(t0)}", address=ADDRESS, max_parallel=2)
    wall = time.time() - t0
    bad = [r for r in runs if r.get("error")]
    if bad:
        raise RuntimeError(f"sweep runs failed: {bad}")
    return {"wall_s": round(wall, 1), "executors": sorted({r["record"]["placement"]["executor"] for r in runs}),
            "train_s": [r["record"].get("train_s") for r in runs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", default="120,400", help="optimizer steps of each sweep run; a comma list")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["DUET_TORCH_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="duet-scheduling-"))
    os.environ["DUET_CONFIG_DIR"] = str(tmp / "config")
    from cluster import two_host

    ws = tmp / "ws"
    lengths = [int(x) for x in str(a.steps).split(",")]
    doc: dict = {"benchmark": "scheduling", "machine": cpu_machine(), "cpu": cpu_features(), "steps_per_sweep_run": lengths, "phases": {}}
    try:
        two_host.start_head(role="executor", bind="127.0.0.2", port=PORT, data_dir=str(tmp / "exec-head"),
                            metrics_port=PORT + 2000)
        two_host.join(address=ADDRESS, role="architect", bind="127.0.0.4", workspace=str(ws))
        for phase in ("1", "2"):
            if phase == "2":
                two_host.join(address=ADDRESS, role="executor", bind="127.0.0.3", name="gpu-b",
                              data_dir=str(tmp / "exec-b"), metrics_port=PORT + 2001, timeout=60)
            warm = [overhead_on(ws, "head")] + ([overhead_on(ws, "gpu-b")] if phase == "2" else [])
            rows = {"warm_up": warm, "overhead": [], "sweep": {str(n): [] for n in lengths}}
            for i in range(a.reps):
                rows["overhead"].append(overhead(ws))
                for n in lengths:
                    rows["sweep"][str(n)].append(sweep(ws, n, f"{phase}x{i}s{n}"))
                print(json.dumps({"executors": phase, "rep": i, "overhead": rows["overhead"][-1],
                                  "sweep": {n: v[-1] for n, v in rows["sweep"].items()}}), flush=True)
            doc["phases"][f"{phase}_executor(s)"] = rows
    finally:
        two_host.stop(all_nodes=True)
    one, two = (doc["phases"][f"{k}_executor(s)"] for k in ("1", "2"))
    walls = {n: {"1_executor": statistics.median(r["wall_s"] for r in one["sweep"][str(n)]),
                 "2_executors": statistics.median(r["wall_s"] for r in two["sweep"][str(n)])} for n in lengths}
    doc.update({
        "sweep_wall_s": {str(n): w for n, w in walls.items()},
        "sweep_speedup": {str(n): round(w["1_executor"] / w["2_executors"], 2) for n, w in walls.items()},
        "goal_speedup": 2.0,
        "submit_to_first_step_s": {k: statistics.median(r["submit_to_first_step_s"] for r in p["overhead"])
                                   for k, p in (("1_executor", one), ("2_executors", two))},
        "queued_to_dispatched_s": {k: statistics.median(r["queued_to_dispatched_s"] for r in p["overhead"])
                                   for k, p in (("1_executor", one), ("2_executors", two))},
        "note": "both executors share this machine's 2 cores (one torch thread each) and its disk; the driver, "
                "the architect and the scheduler run on the same cores",
    })
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scheduling-{doc['machine']}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("sweep_wall_s", "sweep_speedup", "submit_to_first_step_s",
                                          "queued_to_dispatched_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
