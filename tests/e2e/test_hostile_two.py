"""Hostile and mistaken input, second round (the surfaces added since the first), through the CLI as a
user runs it: each case exits with the documented code, names what is wrong, prints no traceback,
stays within time, and changes nothing stored."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.e2e.test_hostile import duet, refused, snapshot

pytestmark = pytest.mark.e2e
EXP = Path(__file__).resolve().parents[1] / "fixtures" / "exports"


def timed(*args, limit: float = 60, **kw):
    t = time.time()
    r = duet(*args, **kw)
    assert time.time() - t < limit, (args, time.time() - t)
    return r


# -- files read out of a workspace stay inside it ----------------------------------------------------

def test_a_symlinked_comparison_is_not_printed(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sweeps" / "sw1").mkdir(parents=True)
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsecret-key-material\n")
    (ws / "sweeps" / "sw1" / "comparison.json").write_text(json.dumps({"rows": []}))
    (ws / "sweeps" / "sw1" / "comparison.md").symlink_to(key)
    r = duet("sweep", "show", "sw1", "-w", ws)
    refused(r, 2, "outside")
    assert "secret-key-material" not in r.stdout + r.stderr


# -- bounded parsers ------------------------------------------------------------------------------------

def _zip(path: Path, name: str, data: bytes, method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr(name, data)
    return path


def _patch_member(path: Path, *, method: int | None = None, flags: int | None = None) -> None:
    """Rewrite the local and central headers' compression method / flag bits (as another zipper wrote them)."""
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        if flags is not None:
            data[i + off:i + off + 2] = flags.to_bytes(2, "little")
        if method is not None:
            data[i + off + 2:i + off + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case,words", [
    ("nested", "nested deeper"), ("deflate64", "Deflate64"), ("encrypted", "encrypted"),
    ("traversal", "leaves the archive"), ("ratio", "zip bomb"),
])
def test_hostile_zips_are_refused_quickly_and_write_nothing(tmp_path, case, words):
    z = tmp_path / "export.zip"
    if case == "nested":  # 1 KB that the old parser grew to tens of GB
        _zip(z, "conversations.json", b"[" + b"[" * 400_000 + b"]" * 400_000 + b"]")
    elif case == "deflate64":
        _zip(z, "conversations.json", (EXP / "claude_conversations.json").read_bytes())
        _patch_member(z, method=9)
    elif case == "encrypted":
        _zip(z, "conversations.json", (EXP / "claude_conversations.json").read_bytes())
        _patch_member(z, flags=1)
    elif case == "traversal":
        _zip(z, "../../conversations.json", (EXP / "claude_conversations.json").read_bytes())
    else:
        _zip(z, "conversations.json", b"[" + b" " * (60 << 20) + b"]")
    out = tmp_path / "out.jsonl"
    r = timed("data", "import", z, "-o", out, limit=60)
    refused(r, 1, words)
    assert not out.exists()


def test_a_malformed_conversation_is_skipped_and_named_and_the_rest_imported(tmp_path):
    convs = json.loads((EXP / "claude_conversations.json").read_text())
    bad = json.loads(json.dumps(convs[0]))
    bad["uuid"] = "bad-attachments-0001"
    bad["chat_messages"][0]["attachments"] = 7
    f = tmp_path / "conversations.json"
    f.write_text(json.dumps([bad] + convs))
    out = tmp_path / "out.jsonl"
    r = duet("data", "import", f, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["records"] > 0 and any("bad-attachments-0001" in s["where"] and "attachments" in s["reason"]
                                      for s in doc["skipped"]), doc["skipped"]


def test_a_million_attachments_import_in_bounded_time(tmp_path):
    convs = json.loads((EXP / "claude_conversations.json").read_text())
    big = json.loads(json.dumps(convs[0]))
    big["uuid"] = "many-attachments"
    big["chat_messages"][0]["attachments"] = [{}] * 1_000_000
    f = tmp_path / "conversations.json"
    f.write_text(json.dumps([big] + convs))
    r = timed("data", "import", f, "-o", tmp_path / "out.jsonl", "--json", limit=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["records"] > 0 and "values in one item" in doc["skipped"][0]["reason"], doc["skipped"]


def test_markdown_built_to_backtrack_imports_in_linear_time(tmp_path):
    lines = ["# " + "1-" * 2500 + "!", "**" + " " * 5000, "- " + " " * 5000 + "x", "<!--" * 2500,
             "User: hi", "Assistant: hello", "# User " + " at 1" * 1200]
    f = tmp_path / "chat.md"
    f.write_text("\n".join(lines) * 4)
    r = timed("data", "import", f, "-o", tmp_path / "out.jsonl", "--format", "markdown", limit=30)
    assert r.returncode in (0, 1), r.stderr


# -- terminals, queues, ids, binds ----------------------------------------------------------------------

def test_stored_escape_sequences_are_shown_not_sent_to_the_terminal(tmp_path):
    ws = tmp_path / "ws"
    sid = duet("session", "start", "escapes", "-w", ws).stdout.strip()
    evil = "look \x1b]52;c;ZXZpbA==\x07 \x1b[2J\x1b[8mhidden\x1b[0m"
    assert duet("session", "log", sid, "--role", "user", "-w", ws, "--", evil).returncode == 0
    for cmd in (("session", "show", sid), ("session", "show", sid, "--raw"), ("session", "resume", sid)):
        r = duet(*cmd, "-w", ws)
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout, cmd
    assert "\\x1b]52" in duet("session", "show", sid, "-w", ws).stdout


@pytest.mark.parametrize("doc,words", [
    ([1, 2], "a JSON list"),
    ({"schema": 1, "entries": [{"run_id": "r1"}, {"run_id": "r1"}]}, "state"),
    ("dup", "appears twice"),
])
def test_a_bad_queue_file_is_refused_before_anything_starts(tmp_path, doc, words):
    ws = tmp_path / "ws"
    (ws / ".duet").mkdir(parents=True)
    if doc == "dup":
        e = {"run_id": "r1", "state": "queued", "plans": {"x": {"estimate": {"total_bytes": 1}}}, "dataset": {},
             "queued_at": 1.0}
        doc = {"schema": 1, "entries": [e, {**e, "state": "running"}]}
    q = ws / ".duet" / "queue.json"
    q.write_text(json.dumps(doc))
    before = snapshot(ws)
    r = duet("up", "-w", ws)
    refused(r, 1, str(q), words)
    assert snapshot(ws) == before


def test_a_bad_run_id_is_an_input_error_before_any_cluster_is_asked(tmp_path):
    refused(duet("runs", "move", "../../x", "--to", "gpu", "-w", tmp_path / "ws"), 1, "run id")
    refused(duet("runs", "show", "a" * 300, "-w", tmp_path / "ws"), 1, "run id")


@pytest.mark.parametrize("bind", ["0", "0x0", "0:0::0", "127.1", "evil.example"])
def test_the_dashboard_binds_only_a_plain_address(tmp_path, bind):
    r = duet("dashboard", "-w", tmp_path / "ws", "--bind", bind, "--port", "8799")
    assert r.returncode == 1, r.stderr
    assert "every interface" in r.stderr or "not an IP address" in r.stderr, r.stderr


def test_ctrl_c_stops_the_dashboard_without_a_traceback(tmp_path):
    from infra import services

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "DUET_CONFIG_DIR": str(tmp_path / "c")}
    port = services.free_port(range(8760, 8790))
    p = subprocess.Popen([sys.executable, "-m", "cluster.cli", "dashboard", "-w", str(tmp_path / "ws"), "--port",
                          str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    deadline = time.time() + 60
    while not services.port_open(port, "127.0.0.1"):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, 2)  # what Ctrl-C sends: SIGINT to the terminal's process group
    out = p.communicate(timeout=30)[0].decode()
    assert p.returncode == 0 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
