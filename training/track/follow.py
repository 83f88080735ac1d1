"""A run's tracker follower: ``python -m training.track.follow RUN_DIR``, one process a run, started by
the executor beside the run (training/run/executor.py) and again after an export or a resume.

It tails the run's folder (training/track/feed.py) and hands each tracker of ``report_to`` what is new:
parameters once, every step, evaluations, recoveries, exports, and at the end the final record, the
artifacts and the status. Training never waits for it: the run only appends to its files, and the
follower reads them in its own process. A tracker that fails (down, refusing) keeps its cursor: the
follower warns once (tracking/follower.log, tracking/status.json, which the executor exports to
Prometheus as ``duet_tracker_up`` and ``duet_tracker_backlog_bytes``), retries with backoff up to a
minute apart, and delivers the backlog when the tracker is back. A resumed run continues the same
tracker run: its id is in ``tracking/<tracker>.json``.

It ends when the run has ended and every tracker has everything, when nothing has trained the run
for 20 s (no process holds its lock: killed, or never started) and nothing is left to send, or after ``DUET_TRACK_GIVE_UP_S`` (default a
week) without reaching a tracker. One follower a run at a time (``tracking/follower.lock``).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from training.run import run_files
from training.track import feed

POLL_S = 1.0
MAX_BACKOFF_S = 60.0
LOGS = ("losses", "events")  # the run's append-only logs the trackers follow (<key>.jsonl, a cursor each)
IDLE_EXIT_S = 20.0  # a run not (yet, or any more) training for this long, with nothing left to send: the follower ends


def tracking_of(run_dir: Path):
    """(report_to, Tracking settings) of the run: ([], the defaults) when it reports to none."""
    from training.track.settings import Tracking, check_report_to

    spec = run_files.read_json(run_dir / "spec.json", {}) or {}
    train = (spec.get("plan") or {}).get("train") or {}
    names = check_report_to(train.get("report_to") or [])
    return names, (Tracking(**train["tracking"]) if train.get("tracking") else Tracking())


def start(run_dir: Path) -> int | None:
    """Start the run's follower unless it reports to no tracker or one already runs; its pid, or None.
    Never raises: a tracker never stops a run (why it could not start is printed)."""
    try:
        return _start(run_dir)
    except Exception as exc:  # noqa: BLE001
        print(f"duet: could not start the tracker follower of {run_dir.name}: {exc}", flush=True)
        return None


def _start(run_dir: Path) -> int | None:
    names, _ = tracking_of(run_dir)
    if not names:
        return None
    (run_dir / "tracking").mkdir(exist_ok=True)
    if held(run_dir):
        return None
    log = open(run_dir / "tracking" / "follower.log", "a")
    p = subprocess.Popen([sys.executable, "-m", "training.track.follow", str(run_dir)], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    log.close()
    threading.Thread(target=p.wait, name=f"duet-follow-{run_dir.name}", daemon=True).start()  # reaped when it ends
    return p.pid


def _locked(path: Path) -> bool:
    """Whether another process holds an flock on ``path`` (a probe: taken and dropped at once when free)."""
    try:
        fh = open(path, "a")
    except OSError:
        return False
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        fh.close()
    return False


def held(run_dir: Path) -> bool:
    """Whether a follower holds the run (its lock)."""
    return _locked(run_dir / "tracking" / "follower.lock")


def give_up_s() -> float:
    raw = os.environ.get("DUET_TRACK_GIVE_UP_S", str(7 * 86400))
    try:
        v = float(raw)
    except ValueError:
        raise SystemExit(f"DUET_TRACK_GIVE_UP_S={raw!r}: give seconds, e.g. 604800") from None
    if not v > 0:
        raise SystemExit(f"DUET_TRACK_GIVE_UP_S={raw!r}: give a positive number of seconds")
    return v


class Follower:
    def __init__(self, run_dir: Path):
        from training.track.clients import make

        self.run_dir = run_dir
        self.dir = run_dir / "tracking"
        names, tracking = tracking_of(run_dir)
        self.trackers = {n: make(n, tracking, run_dir) for n in names}
        self.opened: set[str] = set()
        self.status: dict[str, dict] = run_files.read_json(self.dir / "status.json", {}) or {}
        spec = run_files.read_json(run_dir / "spec.json", {}) or {}
        self.group = feed.group(spec)

    def cursor(self, name: str) -> dict:
        return run_files.read_json(self.dir / f"{name}.json", {}) or {}

    def save(self, name: str, cur: dict) -> None:
        run_files.atomic_json(self.dir / f"{name}.json", cur)

    def deliver(self, name: str) -> bool:
        """Send tracker ``name`` what it has not had; True when it has everything of an ended run. The
        tracker's run is opened only when there is something to send (a follower started for an ended,
        delivered run touches nothing), and closed again with the run's status once the run has ended."""
        t, cur = self.trackers[name], self.cursor(name)

        def tracker():
            if name not in self.opened:
                cur["run"] = t.open(cur.get("run") or {}, self.run_dir.name, self.group)
                self.opened.add(name)
                self.save(name, cur)
            return t

        if not cur.get("params"):
            plan = self.dir / "plan.json"
            run_files.atomic_json(plan, feed.plan_document(self.run_dir))
            tracker().params(feed.params(self.run_dir))
            t.artifact(plan)
            cur["params"] = True
            self.save(name, cur)
        self._drain(name, cur, "losses", lambda rows: tracker().metrics(
            [(int(e.get("step", 0)), float(e.get("time") or time.time()), feed.step_metrics(e))
             for e in rows if isinstance(e, dict) and "step" in e]))
        self._drain(name, cur, "events", lambda rows: self._events(tracker, cur, rows))
        end = feed.final(self.run_dir)
        if end is not None and not cur.get("final"):
            tracker().metrics([(end["steps"], time.time(), end["metrics"])])
            if end["error"]:
                t.note("error", end["steps"], end["error"])
            for path in end["artifacts"]:
                t.artifact(path)
            cur["final"] = end["status"]
            self.save(name, cur)
        sent = set(cur.get("exports_sent", []))
        for e in feed.exports(self.run_dir):
            if e["time"] not in sent:
                tracker().note(f"export.{len(sent) + 1}", end["steps"] if end else 0, json.dumps(e, default=str))
                sent.add(e["time"])
                cur["exports_sent"] = sorted(sent, key=str)
                self.save(name, cur)
        if end is not None and name in self.opened:
            t.finish(end["status"])
            self.opened.discard(name)
        return end is not None

    def _drain(self, name: str, cur: dict, key: str, send) -> None:
        """Hand ``send`` the whole lines of ``<key>.jsonl`` after the cursor, a chunk at a time, saving the
        cursor after each chunk is taken."""
        while True:
            rows, off = feed.tail(self.run_dir / f"{key}.jsonl", cur.get(key, 0))
            if off == cur.get(key, 0):
                return
            send(rows)
            cur[key] = off
            self.save(name, cur)

    @staticmethod
    def _events(tracker, cur: dict, rows: list) -> None:
        """Evaluations as metrics; each recovery (OOM re-plan, rollback, resume, ...) a note and a count.
        ``tracker()`` opens the tracker's run, called only when an event is for it."""
        items = [x for x in (feed.event_item(e) for e in rows if isinstance(e, dict)) if x]
        metrics = [(step, time.time(), vals) for kind, step, vals in items if kind == "metrics"]
        if metrics:
            tracker().metrics(metrics)
        n = cur.get("recoveries", 0)
        for kind, step, vals in items:
            if kind == "recovery":
                n += 1
                tracker().note(f"recovery.{n}", step, json.dumps(vals, default=str))
                tracker().metrics([(step, float(vals.get("time") or time.time()), {"duet/recoveries": float(n)})])
        cur["recoveries"] = n

    def backlog(self, name: str) -> int:
        """Bytes of the run's logs after the tracker's cursor."""
        cur, size = self.cursor(name), 0
        for key in LOGS:
            try:
                size += max(0, (self.run_dir / f"{key}.jsonl").stat().st_size - cur.get(key, 0))
            except OSError:
                pass
        return size

    def training_alive(self) -> bool:
        """Whether a process trains the run: it holds the run's lock (training/run/run_files.acquire_lock)
        from before preflight until it ends, and the kernel drops it when that process dies (a kill -9)."""
        return _locked(self.run_dir / ".lock")

    def loop(self) -> int:
        delay, last_ok, limit, idle_since = POLL_S, time.time(), give_up_s(), None
        while True:
            done = True
            for name in self.trackers:
                st = self.status.setdefault(name, {"up": True, "error": None})
                try:
                    done = self.deliver(name) and done
                    if not st["up"]:
                        print(f"{time.strftime('%H:%M:%S')} {name}: reachable again, backlog delivered", flush=True)
                    st.update(up=True, error=None, delivered_at=time.time())
                    last_ok = time.time()
                except Exception as exc:  # noqa: BLE001 - a tracker's failure never ends the follower
                    done = False
                    if st["up"] or st.get("error") != str(exc)[:300]:
                        print(f"{time.strftime('%H:%M:%S')} warning: {name}: {exc}; retrying, nothing is lost", flush=True)
                    st.update(up=False, error=str(exc)[:300], since=st.get("since") if not st["up"] else time.time())
                    self.opened.discard(name)
                st["backlog_bytes"] = self.backlog(name)
            run_files.atomic_json(self.dir / "status.json", self.status)
            if done:
                return 0
            healthy = all(s["up"] for s in self.status.values())
            if healthy and all(s["backlog_bytes"] == 0 for s in self.status.values()) and not self.training_alive():
                idle_since = idle_since or time.time()
                if time.time() - idle_since > IDLE_EXIT_S:
                    return 0  # nothing trains the run and all it wrote is delivered: a resume starts another follower
            else:
                idle_since = None
            if time.time() - last_ok > limit:
                print(f"giving up after {limit:.0f} s without a tracker: the backlog stays in the run's folder; "
                      "a resume or an export starts a new follower", flush=True)
                return 1
            delay = POLL_S if healthy else min(MAX_BACKOFF_S, max(delay * 2, 2.0))
            time.sleep(delay)

    def close(self) -> None:
        for t in self.trackers.values():
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass


class StatusCollector:
    """Prometheus: each run's trackers from tracking/status.json (duet_tracker_up, duet_tracker_backlog_bytes)."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("duet_tracker_up", "1 when the run's tracker took the last delivery, 0 while it fails.",
                               labels=["run_id", "tracker"])
        backlog = GaugeMetricFamily("duet_tracker_backlog_bytes", "Bytes of the run's logs not yet delivered to the "
                                                                  "tracker.", labels=["run_id", "tracker"])
        for path in sorted((self.data_dir / "runs").glob("*/tracking/status.json")):
            for name, st in (run_files.read_json(path, {}) or {}).items():
                if isinstance(st, dict):
                    up.add_metric([path.parent.parent.name, name], 1.0 if st.get("up") else 0.0)
                    backlog.add_metric([path.parent.parent.name, name], float(st.get("backlog_bytes") or 0))
        yield up
        yield backlog


def main(argv=None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0]).resolve()
    (run_dir / "tracking").mkdir(exist_ok=True)
    lock = open(run_dir / "tracking" / "follower.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another follower has this run
    (run_dir / "tracking" / "follower.pid").write_text(str(os.getpid()))
    f = Follower(run_dir)
    try:
        return f.loop()
    finally:
        f.close()


if __name__ == "__main__":
    sys.exit(main())
