"""A long run with everything following it: does memory stay flat?

    python -m benchmarks.soak [--steps 20000] [--sample-s 10]

One real tiny run on the embedded cluster (`duet up --dashboard`, as users start it), trained through
`duet run --detach` for ``--steps`` optimizer steps (one logged loss a step), while the dashboard's
live stream (``/api/runs/<id>/stream``, read like a browser: reconnecting with Last-Event-ID) and
`duet watch RUN` follow it. Every ``--sample-s`` seconds the resident memory (RSS) of the executor
actor (which trains the run in its own thread: the executor is the trainer on a one-worker run), the
dashboard's server process and `duet watch` is recorded with the run's step.

Growth is measured over the samples taken while the run trains (the last one before it ends).
Goal: each process's RSS grows by under 5 % from step 1,000 to the end. Writes
benchmarks/results/soak-<machine>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import psutil

from benchmarks import cpu_features, cpu_machine, versions
from benchmarks.dashboard import DATA, REPO, _opener, duet, isolated
from infra.run_states import TERMINAL


def _executor_pid() -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::Executor"):
            return p.pid
    return None


def _rss(pid: int | None) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except psutil.Error:
        return None


def _follow_stream(base: str, run_id: str, cookie: str, stop: threading.Event, seen: dict) -> None:
    """The run page's live stream, read as a browser reads it (reconnects continue from Last-Event-ID)."""
    u = urlsplit(base)
    last_id = None
    while not stop.is_set():
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            h = {"Cookie": cookie, "Accept": "text/event-stream", "Host": f"{u.hostname}:{u.port}"}
            if last_id:
                h["Last-Event-ID"] = last_id
            c.request("GET", f"/api/runs/{run_id}/stream", headers=h)
            r = c.getresponse()
            for raw in r:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: ") and len(line) > 8:
                    seen["messages"] += 1
                elif line.startswith("event: end"):
                    stop.set()
                if stop.is_set():
                    break
            c.close()
        except (OSError, http.client.HTTPException):
            time.sleep(1)


ENDED = TERMINAL + ("queued",)


def growth(samples: list[dict], key: str, from_step: int) -> dict:
    pts = [s for s in samples if s[key] and s["step"] >= from_step and s["state"] not in ENDED]
    if len(pts) < 2:
        return {"from_mib": None, "to_mib": None, "growth_pct": None}
    a, b = pts[0][key], pts[-1][key]
    return {"from_step": pts[0]["step"], "to_step": pts[-1]["step"], "from_mib": round(a / 2**20, 1),
            "to_mib": round(b / 2**20, 1), "max_mib": round(max(p[key] for p in pts) / 2**20, 1),
            "growth_pct": round(100 * (b - a) / a, 2)}


def main(argv=None) -> dict:
    """Long because one cluster, one run and three followers are started, sampled and stopped in order."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--from-step", type=int, default=1000)
    a = ap.parse_args(argv)
    tmp, env = isolated("soak")
    ws = tmp / "ws"
    cfg = tmp / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{DATA}]\ndataset: persona\n"
                   f"overrides: {{max_steps: {a.steps}, checkpoint_every: 1000, eval_every: 1000, sample_prompts: 1, "
                   "micro_batch: 1}\n")
    up = json.loads(duet("up", "--dashboard", "--workspace", str(ws), "--json", env=env))
    dash = up["dashboard"]
    base = dash["url"].rstrip("/")
    samples: list[dict] = []
    stop = threading.Event()
    seen = {"messages": 0}
    watch = None
    t0 = time.time()
    try:
        run_id = json.loads(duet("run", str(cfg), "--detach", "--workspace", str(ws), "--json", env=env))["run_id"]
        op = _opener(dash["login_url"])
        cookie = "; ".join(f"{c.name}={c.value}" for h in op.handlers if hasattr(h, "cookiejar") for c in h.cookiejar)
        follower = threading.Thread(target=_follow_stream, args=(base, run_id, cookie, stop, seen), daemon=True)
        follower.start()
        watch = subprocess.Popen([sys.executable, "-m", "cluster.cli", "watch", run_id, "--workspace", str(ws)],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = psutil.Process(dash["pid"]).children()
        server_pid = server[0].pid if server else dash["pid"]
        executor = None
        while True:
            executor = executor or _executor_pid()
            row = next(r for r in json.loads(op.open(f"{base}/api/runs", timeout=60).read())["runs"]
                       if r["run_id"] == run_id)
            samples.append({"t": round(time.time() - t0, 1), "step": row.get("step") or 0, "state": row["state"],
                            "executor": _rss(executor),
                            "dashboard": _rss(server_pid), "watch": _rss(watch.pid)})
            if row["state"] in ("failed", "cancelled", "finished"):
                break
            time.sleep(a.sample_s)
        state = row["state"]
    finally:
        stop.set()
        if watch is not None:
            watch.terminate()
            watch.wait(30)
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--workspace", str(ws)], cwd=REPO, env=env,
                       capture_output=True, timeout=300)
    res = {k: growth(samples, k, a.from_step) for k in ("executor", "dashboard", "watch")}
    doc = {
        "benchmark": "soak", "machine": cpu_machine(), "cpu": cpu_features(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": versions("torch", "transformers", "ray", "starlette", "matplotlib"),
        "run": {"run_id": run_id, "model": "tiny (Qwen2, hidden 64, 2 layers)", "max_steps": a.steps,
                "state": state, "seconds": round(time.time() - t0, 1), "stream_messages": seen["messages"]},
        "rss_growth_from_step": a.from_step, "rss": res,
        "goals": {f"{k}_growth_under_5pct": {"value_pct": v["growth_pct"], "met": v["growth_pct"] is not None
                                             and v["growth_pct"] < 5} for k, v in res.items()},
        "samples": samples,
        "how": "duet up --dashboard; duet run --detach (tiny model, one logged loss a step); the dashboard's SSE "
               "stream followed with Last-Event-ID reconnects and `duet watch RUN` running; RSS sampled with psutil",
    }
    out = REPO / "benchmarks" / "results" / f"soak-{cpu_machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("run", "rss", "goals")}, indent=2))
    return doc


if __name__ == "__main__":
    main()
