"""Two hosts in two network namespaces: each node has its own network stack and IP, joined by a
veth pair (10.231.0.1 GPU host, 10.231.0.2 design host), the way a LAN or a VPN joins two machines.
Loopback tricks cannot hide a node that binds or dials the wrong address here: each namespace has
its own loopback, and the head's ports exist only in its namespace.

Needs root and `ip netns`; skips with the reason where the machine does not allow it.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
NS_A, NS_B = "duet-e2e-a", "duet-e2e-b"
IP_A, IP_B = "10.231.0.1", "10.231.0.2"
PORT = 6431


def _ip(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _teardown() -> None:
    for ns in (NS_A, NS_B):
        _ip("netns", "del", ns)


def _namespaces_or_skip() -> None:
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) on this machine")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    _teardown()  # left over from an interrupted run
    steps = [("netns", "add", NS_A), ("netns", "add", NS_B),
             ("link", "add", "duet-e2e-va", "type", "veth", "peer", "name", "duet-e2e-vb"),
             ("link", "set", "duet-e2e-va", "netns", NS_A), ("link", "set", "duet-e2e-vb", "netns", NS_B),
             ("-n", NS_A, "addr", "add", f"{IP_A}/24", "dev", "duet-e2e-va"),
             ("-n", NS_B, "addr", "add", f"{IP_B}/24", "dev", "duet-e2e-vb"),
             ("-n", NS_A, "link", "set", "duet-e2e-va", "up"), ("-n", NS_B, "link", "set", "duet-e2e-vb", "up"),
             ("-n", NS_A, "link", "set", "lo", "up"), ("-n", NS_B, "link", "set", "lo", "up")]
    for s in steps:
        r = _ip(*s)
        if r.returncode != 0:
            _teardown()
            pytest.skip(f"network namespaces unavailable here: `ip {' '.join(s)}` said {r.stderr.strip()!r}")


def duet_in(ns: str, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "cluster.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def listening(ns: str | None) -> set[int]:
    code = "import psutil; print([c.laddr.port for c in psutil.net_connections('tcp') if c.status == 'LISTEN'])"
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-c", code]
    return set(json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout))


def ok(r) -> dict:
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return json.loads(r.stdout)


@pytest.fixture
def namespaces():
    _namespaces_or_skip()
    yield
    subprocess.run([sys.executable, "-m", "cluster.cli", "node", "stop", "--all"], capture_output=True,
                   timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    _teardown()


def test_two_hosts_in_two_network_namespaces(namespaces, tmp_path):
    ws = tmp_path / "ws"
    head = ok(duet_in(NS_A, "node", "start", "--role", "executor", "--head", "--bind", IP_A, "--port", str(PORT),
                      "--data-dir", str(tmp_path / "executor-data"), "--metrics-port", "8431", "--json"))
    assert head["address"] == f"{IP_A}:{PORT}" and head["actor"]["role"] == "executor"
    # the head listens inside its own network stack, not in this (root) namespace's
    assert PORT in listening(NS_A) and PORT not in listening(None)

    joined = ok(duet_in(NS_B, "node", "join", "--role", "architect", "--address", head["address"], "--bind", IP_B,
                        "--workspace", str(ws), "--json"))
    assert joined["versions"]["checked"]

    # both sides see the same two-host cluster, with each role's actor on its own host
    for ns in (NS_A, NS_B):
        st = ok(duet_in(ns, "status", "--address", head["address"], "--workspace", str(ws), "--json"))["cluster"]
        roles = {n["address"]: n["roles"] for n in st["nodes"] if n["alive"]}
        assert roles == {IP_A: ["executor"], IP_B: ["architect"]}, (ns, st["nodes"])
        where = {a["name"]: a["address"] for a in st["actors"]}
        assert where == {"duet-executor": IP_A, "duet-architect": IP_B, "duet-scheduler": IP_A}, (ns, st["actors"])

    # the design host leaves; the GPU host's cluster goes on without it
    r = duet_in(NS_B, "node", "stop")  # the newest node duet started here: the design host's
    assert r.returncode == 0, r.stderr[-2000:]
    deadline = time.time() + 15  # health checks every second, 3 misses: noticed in seconds
    while True:
        st = ok(duet_in(NS_A, "status", "--address", head["address"], "--json"))["cluster"]
        alive = {n["address"] for n in st["nodes"] if n["alive"]}
        if alive == {IP_A} or time.time() > deadline:
            break
    assert alive == {IP_A}, st
    assert {a["name"] for a in st["actors"]} == {"duet-executor", "duet-scheduler"}
