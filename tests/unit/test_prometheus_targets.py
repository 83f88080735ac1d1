"""`duet infra up --exporter NODE=HOST:PORT ...`: one scrape target per executor, each labelled with its
node, in a config promtool accepts."""

import shutil
import subprocess

import pytest
import yaml

from infra import monitoring

PORTS = {"prometheus": 9490, "alertmanager": 9493, "receiver": 9497}


def targets(doc: dict) -> dict:
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "duet-executor")
    return {c["labels"]["node"]: c["targets"] for c in job["static_configs"]}


def test_every_executor_is_a_target_labelled_by_node(tmp_path):
    paths = monitoring.render(tmp_path, exporter=["head=10.0.0.2:9108", "gpu-b=10.0.0.3:9108", "10.0.0.4:9109"],
                              ports=PORTS, webhook=None)
    doc = yaml.safe_load(paths["prometheus.yml"].read_text())
    assert targets(doc) == {"head": ["10.0.0.2:9108"], "gpu-b": ["10.0.0.3:9108"], "10.0.0.4": ["10.0.0.4:9109"]}
    assert doc["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9493"]
    one = yaml.safe_load(monitoring.render(tmp_path / "one", exporter="127.0.0.1:9200", ports=PORTS,
                                           webhook=None)["prometheus.yml"].read_text())
    assert targets(one) == {"head": ["127.0.0.1:9200"]}
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run(["promtool", "check", "config", str(paths["prometheus.yml"])], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
