"""`duet infra up|down|status`: Prometheus + Alertmanager (the system's binaries) with the shipped
configs in infra/prometheus/, plus duet's alert webhook, under ``<workspace>/.duet/infra/``.

Ports (loopback, outside Ray's 10002-19999): Prometheus 9490, Alertmanager 9493, webhook 9497; the
exporter scraped is 127.0.0.1:9108 unless given. Processes are recorded by PID and stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.services import HOST, ServiceError, StateFile, pid_alive, port_open, stop_pid

CONFIGS = Path(__file__).resolve().parent / "prometheus"
DEFAULTS = {"prometheus": 9490, "alertmanager": 9493, "receiver": 9497}
INSTALL = ("install them: Debian/Ubuntu `sudo apt-get install prometheus prometheus-alertmanager`; "
           "macOS `brew install prometheus alertmanager`")


def binaries() -> dict:
    return {"prometheus": shutil.which("prometheus"), "promtool": shutil.which("promtool"),
            "alertmanager": shutil.which("alertmanager") or shutil.which("prometheus-alertmanager"),
            "amtool": shutil.which("amtool")}


def state_dir(workspace) -> Path:
    return Path(workspace).resolve() / ".duet" / "infra"


def exporter_targets(exporter: str | list[str]) -> list[tuple[str, str]]:
    """``[NODE=]HOST:PORT`` (one, or a list: every executor serves its own exporter) -> [(node, target)];
    a target without a name is "head" when it is the only one, else named by its address."""
    items = [exporter] if isinstance(exporter, str) else list(exporter)
    out = []
    for item in items:
        node, sep, target = item.rpartition("=")
        out.append((node if sep else ("head" if len(items) == 1 else target.rsplit(":", 1)[0]), target))
    return out


def render(out: Path, *, exporter: str | list[str], ports: dict, webhook: str | None) -> dict:
    """Write the configs with this workspace's ports and one scrape target per executor (labelled
    ``node``); returns their paths."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    prom = (CONFIGS / "prometheus.yml").read_text().replace('"127.0.0.1:9493"', f'"{HOST}:{ports["alertmanager"]}"')
    doc = yaml.safe_load(prom)
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "duet-executor")
    labels = job["static_configs"][0].get("labels", {})
    job["static_configs"] = [{"targets": [t], "labels": {**labels, "node": n}} for n, t in exporter_targets(exporter)]
    prom = "# rendered by duet infra up from infra/prometheus/prometheus.yml\n" + yaml.safe_dump(doc, sort_keys=False)
    am = (CONFIGS / "alertmanager.yml").read_text()
    am = am.replace("http://127.0.0.1:9497/alerts", webhook or f"http://{HOST}:{ports['receiver']}/alerts")
    paths = {"prometheus.yml": out / "prometheus.yml", "rules.yml": out / "rules.yml", "alertmanager.yml": out / "alertmanager.yml"}
    paths["prometheus.yml"].write_text(prom)
    shutil.copyfile(CONFIGS / "rules.yml", paths["rules.yml"])
    paths["alertmanager.yml"].write_text(am)
    return paths


def _ready(url: str, timeout: float = 30, pid: int | None = None, what: str = "", log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        if pid is not None and not pid_alive(pid):
            break
        time.sleep(0.2)
    tail = log.read_text()[-1500:] if log and log.exists() else ""
    raise ServiceError(f"{what} is not ready at {url} (log {log}):\n{tail}")


def _start(st: StateFile, name: str, cmd: list[str], port: int, ready: str, what: str) -> None:
    """Start one service in its own session, record it by PID, wait until ``ready`` (a path) answers."""
    log = st.path.parent / f"{name}.log"
    with open(log, "ab") as fh:
        pid = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True).pid
    url = f"http://{HOST}:{port}"
    st.update(name, {"pid": pid, "port": port, "url": url + ("/alerts" if name == "receiver" else "")})
    _ready(url + ready, pid=pid, what=what, log=log)


def up(workspace, *, exporter: str | list[str] = f"{HOST}:9108", ports: dict | None = None, webhook: str | None = None) -> dict:
    ports = {**DEFAULTS, **(ports or {})}
    b = binaries()
    missing = [k for k in ("prometheus", "alertmanager") if not b[k]]
    if missing:
        raise ServiceError(f"{' and '.join(missing)} not found on PATH; {INSTALL}")
    sd = state_dir(workspace)
    st = StateFile(sd)
    known = st.read()
    if known and all(pid_alive(v["pid"]) for v in known.values()):
        return {"reused": True, **status(workspace)}
    down(workspace)
    paths = render(sd, exporter=exporter, ports=ports, webhook=webhook)
    try:
        if not webhook:
            if port_open(ports["receiver"]):
                raise ServiceError(f"port {ports['receiver']} (webhook) is taken; pass other ports")
            _start(st, "receiver", [sys.executable, "-m", "infra.receiver", "--port", str(ports["receiver"]),
                                    "--out", str(sd / "alerts.jsonl")], ports["receiver"], "/", "the webhook receiver")
        _start(st, "alertmanager", [b["alertmanager"], f"--config.file={paths['alertmanager.yml']}",
                                    f"--storage.path={sd / 'alertmanager'}", "--cluster.listen-address=",
                                    f"--web.listen-address={HOST}:{ports['alertmanager']}"],
               ports["alertmanager"], "/-/ready", "Alertmanager")
        _start(st, "prometheus", [b["prometheus"], f"--config.file={paths['prometheus.yml']}",
                                  f"--storage.tsdb.path={sd / 'prometheus'}", f"--web.listen-address={HOST}:{ports['prometheus']}"],
               ports["prometheus"], "/-/ready", "Prometheus")
    except ServiceError:
        down(workspace)
        raise
    return {"reused": False, **status(workspace)}


def down(workspace) -> list[str]:
    st = StateFile(state_dir(workspace))
    stopped = []
    for name in ("prometheus", "alertmanager", "receiver"):
        v = st.read().get(name)
        if v:
            if pid_alive(v["pid"]):
                stop_pid(v["pid"])
                stopped.append(name)
            st.update(name, None)
    return stopped


def status(workspace) -> dict:
    sd = state_dir(workspace)
    doc = {"dir": str(sd), "binaries": binaries(), "services": {}}
    for name, v in StateFile(sd).read().items():
        doc["services"][name] = {**v, "alive": pid_alive(v["pid"]), "reachable": port_open(v["port"])}
    prom = doc["services"].get("prometheus")
    if prom and prom["reachable"]:
        try:
            with urllib.request.urlopen(f"{prom['url']}/api/v1/alerts", timeout=3) as r:
                alerts = json.loads(r.read())["data"]["alerts"]
            doc["alerts"] = [{"name": a["labels"].get("alertname"), "state": a["state"],
                              "labels": a["labels"]} for a in alerts]
            with urllib.request.urlopen(f"{prom['url']}/api/v1/targets", timeout=3) as r:
                doc["targets"] = [{"url": t["scrapeUrl"], "health": t["health"]}
                                  for t in json.loads(r.read())["data"]["activeTargets"]]
        except Exception as exc:
            doc["error"] = f"{type(exc).__name__}: {exc}"
    received = sd / "alerts.jsonl"
    doc["received"] = sum(1 for _ in received.open()) if received.exists() else 0
    return doc
