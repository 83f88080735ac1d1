"""The trackers a run reports to, one class each with the same calls: ``open`` (create the tracker's
run, or continue the one the cursor names), ``params``, ``metrics`` (rows of step, time, values),
``note`` (a recovery, an export: text at a step), ``artifact`` (a file), ``finish`` (the status) and
``close``.
A call that fails raises; the follower (training/track/follow.py) keeps the cursor where it was and
retries, so nothing is lost while a tracker is down.

- MLflow through its REST API (``/api/2.0/mlflow``; artifacts through the server's artifact proxy,
  ``mlflow server``'s default), with urllib: no MLflow client on the executor, and every request has
  a timeout. Credentials from MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.
- TensorBoard event files through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
- Trackio and W&B through their own clients (the ``trackers`` extra), W&B offline by default.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from training.track.settings import check_uri, safe_name


class TrackerError(RuntimeError):
    pass


# -- MLflow ------------------------------------------------------------------------------------------

class Mlflow:
    name = "mlflow"
    BATCH = 900  # log-batch takes at most 1000 metrics and 100 params a call

    def __init__(self, settings, run_dir: Path, timeout: float = 10.0):
        try:  # the config's URI was checked with the config; the environment's is checked here, the same way
            self.uri = settings.tracking_uri or check_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)
        except ValueError as exc:
            raise TrackerError(f"MLFLOW_TRACKING_URI: {exc}") from None
        if not self.uri:
            raise TrackerError("report_to mlflow: set train.tracking.mlflow.tracking_uri in the run config or "
                               "MLFLOW_TRACKING_URI (http(s)://host:port) on the executor host")
        self.experiment, self.run_dir, self.timeout = settings.experiment, run_dir, timeout
        self.run_id = self.experiment_id = self.artifact_uri = None

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            h["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            h["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        return h

    def _call(self, method: str, path: str, body: dict | None = None, query: dict | None = None,
              data: bytes | None = None, ok_codes: tuple = ()) -> dict:
        url = self.uri + path + ("?" + urllib.parse.urlencode(query) if query else "")
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        headers = self._headers()
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        req = urllib.request.Request(url, data=payload, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if any(code in detail for code in ok_codes):
                return {"_error": detail}
            raise TrackerError(f"MLflow {method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TrackerError(f"MLflow at {self.uri} unreachable: {exc}") from None
        return json.loads(text) if text.strip() else {}

    def _experiment(self) -> str:
        got = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name", query={"experiment_name": self.experiment},
                         ok_codes=("RESOURCE_DOES_NOT_EXIST",))
        if "experiment" in got:
            return got["experiment"]["experiment_id"]
        made = self._call("POST", "/api/2.0/mlflow/experiments/create", {"name": self.experiment},
                          ok_codes=("RESOURCE_ALREADY_EXISTS",))
        return made.get("experiment_id") or self._experiment()

    def open(self, state: dict, run_name: str, group: str | None) -> dict:
        if state.get("run_id"):
            self.run_id, self.experiment_id, self.artifact_uri = state["run_id"], state["experiment_id"], state.get("artifact_uri")
            self._call("POST", "/api/2.0/mlflow/runs/update", {"run_id": self.run_id, "status": "RUNNING"})
            return state
        self.experiment_id = self._experiment()
        tags = [{"key": "mlflow.runName", "value": run_name}, {"key": "mlflow.source.name", "value": "duet"},
                {"key": "duet.run_id", "value": run_name}]
        if group:
            tags.append({"key": "duet.sweep_id", "value": group})
        got = self._call("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": self.experiment_id, "run_name": run_name,
                                                                 "start_time": int(time.time() * 1000), "tags": tags})
        self.run_id, self.artifact_uri = got["run"]["info"]["run_id"], got["run"]["info"].get("artifact_uri")
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "artifact_uri": self.artifact_uri}

    def params(self, values: dict[str, str]) -> None:
        items = [{"key": k[:250], "value": v[:6000]} for k, v in values.items()]
        for i in range(0, len(items), 100):
            # a parameter already logged with the same value is fine; MLflow refuses a changed one
            self._call("POST", "/api/2.0/mlflow/runs/log-batch", {"run_id": self.run_id, "params": items[i:i + 100]},
                       ok_codes=("INVALID_PARAMETER_VALUE",))

    def metrics(self, rows: list[tuple[int, float, dict]]) -> None:
        flat = [{"key": k, "value": v, "timestamp": int(t * 1000), "step": step} for step, t, vals in rows for k, v in vals.items()]
        for i in range(0, len(flat), self.BATCH):
            self._call("POST", "/api/2.0/mlflow/runs/log-batch", {"run_id": self.run_id, "metrics": flat[i:i + self.BATCH]})

    def note(self, key: str, step: int, text: str) -> None:
        self._call("POST", "/api/2.0/mlflow/runs/set-tag", {"run_id": self.run_id, "key": f"duet.{key}", "value": text[:5000]})

    def artifact(self, path: Path) -> None:
        root = self.artifact_uri or f"mlflow-artifacts:/{self.experiment_id}/{self.run_id}/artifacts"
        if not root.startswith("mlflow-artifacts:"):
            raise TrackerError(f"MLflow stores this run's artifacts at {root}, which duet cannot write over HTTP: "
                               "start the server with its artifact proxy (mlflow server --serve-artifacts, the default)")
        rel = root.split(":", 1)[1].lstrip("/") + "/" + path.name
        self._call("PUT", "/api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(rel), data=path.read_bytes())

    def finish(self, status: str) -> None:
        self._call("POST", "/api/2.0/mlflow/runs/update", {"run_id": self.run_id, "end_time": int(time.time() * 1000),
                                                           "status": {"finished": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED")})

    def close(self) -> None:
        pass


# -- TensorBoard -------------------------------------------------------------------------------------

class Tensorboard:
    name = "tensorboard"

    def __init__(self, settings, run_dir: Path):
        self.root = Path(settings.dir).expanduser() if settings.dir else run_dir / "tracking" / "tensorboard"
        self.run_dir, self.writer = run_dir, None

    def open(self, state: dict, run_name: str, group: str | None) -> dict:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TrackerError(f"report_to tensorboard needs the tensorboard package on the executor host "
                               f"(pip install 'duet[trackers]'): {exc}") from None
        logdir = self.root / (safe_name(group) if group else "") / safe_name(run_name)
        self.writer = SummaryWriter(log_dir=str(logdir))  # a resumed run appends a new event file to the same folder
        return {**state, "logdir": str(logdir)}

    def params(self, values: dict[str, str]) -> None:
        table = "| parameter | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in sorted(values.items()))
        self.writer.add_text("duet/params", table, 0)
        self.writer.flush()

    def metrics(self, rows: list[tuple[int, float, dict]]) -> None:
        for step, t, vals in rows:
            for k, v in vals.items():
                self.writer.add_scalar(k, v, step, walltime=t)
        self.writer.flush()

    def note(self, key: str, step: int, text: str) -> None:
        self.writer.add_text(f"duet/{key.split('.')[0]}", text, step)
        self.writer.flush()

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import numpy as np
            from PIL import Image

            self.writer.add_image("duet/" + path.stem, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
        else:
            self.writer.add_text("duet/" + path.name, path.read_text(errors="replace")[:100_000], 0)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.add_text("duet/status", status, 0)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
