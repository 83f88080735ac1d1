"""A local MLflow tracking server (``mlflow server``, SQLite store, artifacts proxied) for the tracker tests
and benchmarks/trackers.py: the one ``make test`` installs in .venv/duet-mlflow (make mlflow-server)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

MLFLOW = Path(__file__).resolve().parents[1] / ".venv" / "duet-mlflow" / "bin" / "mlflow"


def start(root: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """The server on 127.0.0.1:``port`` with its store under ``root``, once it answers /health; RuntimeError
    with its log's tail (and the server stopped) when it dies or the time runs out."""
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--artifacts-destination", str(root / "artifacts")],
                         stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return p
        except OSError:
            time.sleep(0.5)
    stop(p)
    raise RuntimeError("mlflow server did not answer: " + (root / "server.log").read_text()[-3000:])


def stop(p: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 20 s."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
