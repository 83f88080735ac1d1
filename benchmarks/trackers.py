"""What reporting to a tracker costs training (issue 39): the same run with no tracker, with an MLflow
server that takes every delivery, and with MLflow down for the whole run.

    python -m benchmarks.trackers [--reps 3] [--steps 12]

SmolLM2-135M LoRA on the demo data (the demo plan for this machine, 12 steps of 4 x 2 examples), each run
through duet's Executor in a process of its own as the executor actor runs it (training/run/solo.py), with
the run's tracker follower (training/track/follow.py) beside it: ``report_to: [mlflow]`` at a local
``mlflow server`` (SQLite store, the one ``make test`` installs in .venv/duet-mlflow), or at a port where
nothing listens. The three arms alternate, --reps times. Tokens/s over the steps after the first two, from
the times the run logged (losses.jsonl). Also recorded: with MLflow up, every step arrived; with it down,
the backlog the follower held when the run finished. Goal: each tracker arm >= 0.97x the run without one.
Writes benchmarks/results/trackers-<machine>-<cpu kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_kind, cpu_machine, versions
from tests import mlflow_server

REPO = Path(__file__).resolve().parents[1]
ARMS = ("none", "mlflow_up", "mlflow_down")
SKIP = 2


def _one(ex, arch, ds, plan: dict, run_id: str, tracking: dict | None) -> dict:
    from training.track.follow import held

    train = {**plan["train"], **({"report_to": ["mlflow"], "tracking": tracking} if tracking else {})}
    ex.submit(arch.submission({**plan, "train": train, "run_id": run_id}, ds))
    state = ex.wait(run_id, timeout=3600)
    rdir = ex.data_dir / "runs" / run_id
    if state != "finished":
        raise RuntimeError(f"{run_id} {state}: {json.loads((rdir / 'run.json').read_text()).get('error')}")
    marks = sorted((json.loads(x) for x in (rdir / "losses.jsonl").read_text().splitlines()), key=lambda e: e["step"])
    t = marks[SKIP:]
    out = {"run_id": run_id, "tokens_per_s": (t[-1]["tokens"] - marks[SKIP - 1]["tokens"]) / (t[-1]["time"] - marks[SKIP - 1]["time"])}
    if tracking:
        status = json.loads((rdir / "tracking" / "status.json").read_text())["mlflow"] if (rdir / "tracking" / "status.json").exists() else {}
        out["tracker_up_at_end"], out["backlog_bytes_at_end"] = status.get("up"), status.get("backlog_bytes")
        deadline = time.time() + (60 if status.get("up") else 0)
        while time.time() < deadline and held(rdir):
            time.sleep(0.5)  # MLflow up: the follower delivers the end and exits
        cur = json.loads((rdir / "tracking" / "mlflow.json").read_text()) if (rdir / "tracking" / "mlflow.json").exists() else {}
        out["delivered_final"] = bool(cur.get("final"))
        pid = rdir / "tracking" / "follower.pid"
        if held(rdir) and pid.exists():  # MLflow down: stop the follower that would retry for a week
            os.kill(int(pid.read_text()), signal.SIGKILL)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from infra import services
    from roles.architect import Architect
    from training.models import model_config
    from training.plan.hardware import probe
    from training.run.executor import Executor

    tmp = Path(tempfile.mkdtemp(prefix="duet-bench-trackers-"))
    arch = Architect(str(tmp / "ws"), None, None, session_title="trackers benchmark")
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    plan = arch.design_plan("demo", probe(tmp).to_dict(), model_config("smollm2"), "smollm2", ds,
                            {"max_steps": a.steps, "micro_batch": 4, "grad_accum": 2, "sample_prompts": 0,
                             "checkpoint_every": 10**6, "eval_every": 10**6})
    port = services.free_port(range(5600, 5700))
    server = mlflow_server.start(tmp / "mlflow", port)
    ex = Executor(tmp / "data", metrics_port=None, process_per_run=True)
    tracking = {"mlflow_up": {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}", "experiment": "bench"}},
                "mlflow_down": {"mlflow": {"tracking_uri": "http://127.0.0.1:1", "experiment": "bench"}}}
    rows: dict[str, list] = {arm: [] for arm in ARMS}
    try:
        for i in range(a.reps):
            for arm in (ARMS if i % 2 == 0 else ARMS[::-1]):
                r = _one(ex, arch, ds, plan, f"{arm.replace('_', '-')}-{i}", tracking.get(arm))
                rows[arm].append(r)
                print(json.dumps({"rep": i, "arm": arm, **r}), flush=True)
    finally:
        mlflow_server.stop(server)
    med = {arm: statistics.median(r["tokens_per_s"] for r in rows[arm]) for arm in ARMS}
    ratios = {f"{arm}_over_none": [round(x["tokens_per_s"] / y["tokens_per_s"], 4) for x, y in zip(rows[arm], rows["none"])]
              for arm in ARMS[1:]}
    feats = cpu_features()
    out = {"benchmark": "trackers", "machine": cpu_machine(), "cpu": feats, "versions": versions("torch", "transformers", "trl"),
           "model": "SmolLM2-135M-Instruct", "steps": a.steps, "plan_dtype": plan["dtype"], "timed_from_step": SKIP + 1,
           "runs": rows, "tokens_per_s_median": med,
           "ratios": {k: {"min": min(v), "median": statistics.median(v), "max": max(v), "reps": v} for k, v in ratios.items()},
           "goals": {k: {"goal": 0.97, "median": statistics.median(v), "met": statistics.median(v) >= 0.97} for k, v in ratios.items()}}
    path = Path(a.out) / f"trackers-{cpu_machine()}-{cpu_kind(feats)}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"ratios": out["ratios"], "goals": out["goals"]}), flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
