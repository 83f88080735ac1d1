"""No secret leaves the machine: a workspace with a bare remote and real stores; each kind of secret,
in a data file (UTF-8, latin-1, UTF-16, gzip), typed into a session or committed by hand, is refused
with exit 2 and found in no object of the remote and no row of either store."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory_sync.workspace import Workspace

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PERSONA = REPO / "examples/persona/persona.jsonl"

# (kind, the secret as a user's file holds it, the part that must never appear anywhere)
SECRETS = [
    ("aws secret key", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzqKEY42", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzqKEY42"),
    ("aws key id", "key id AKIAZ7QXRWPLMN3VBT4K", "AKIAZ7QXRWPLMN3VBT4K"),
    ("psycopg url", "db postgresql+psycopg://app:Xk9-mUq2pLz@db.internal/app", "Xk9-mUq2pLz"),
    ("mongo srv url", "mongodb+srv://admin:Tq8vLm3Rz@cluster0.example.net/db", "Tq8vLm3Rz"),
    ("https url", "clone https://bob:Gh7pQ2xVc@git.example.com/r.git", "Gh7pQ2xVc"),
    ("hugging face", "HF_TOKEN=hf_QmZxVbNcLkJhGfDsApOiUyTrEwQ0123456", "hf_QmZxVbNcLkJhGfDsApOiUyTrEwQ0123456"),
    ("github", "ghp_Ab3De6Gh9Jk2Mn5Pq8St1Vw4Yz7Bc0Ef3Hi6", "ghp_Ab3De6Gh9Jk2Mn5Pq8St1Vw4Yz7Bc0Ef3Hi6"),
    ("private key", "-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU="),
    ("ray token", "RAY_AUTH_TOKEN=4f1c9e2a7b3d8f6e0a5c1b9d7e3f2a8c", "4f1c9e2a7b3d8f6e0a5c1b9d7e3f2a8c"),
    ("password", '"password": "correct-horse-battery-9"', "correct-horse-battery-9"),
]


def duet(*args, env=None, stdin=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), "DUET_EMBEDDER": "hashing", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=180,
                          env=e, input=stdin)


def remote_bytes(bare: Path) -> bytes:
    """Every object of the bare remote, decompressed (what anyone who clones it can read)."""
    return subprocess.run(["git", "-C", str(bare), "cat-file", "--batch-all-objects", "--batch"],
                          capture_output=True, check=True).stdout


def store_text(env: dict) -> str:
    import psycopg
    import pymongo

    out = []
    with psycopg.connect(env["DUET_POSTGRES_URL"]) as c:
        for t in ("sessions", "events", "facts", "runs", "alerts"):
            try:
                out += [json.dumps(r, default=str) for r in c.execute(f"SELECT * FROM {t}").fetchall()]
            except psycopg.errors.UndefinedTable:
                c.rollback()
    mc = pymongo.MongoClient(env["DUET_MONGO_URL"], serverSelectionTimeoutMS=5000)
    db = mc.get_default_database()
    for col in db.list_collection_names():
        out += [json.dumps(d, default=str) for d in db[col].find({}, {"_id": 0})]
    mc.close()
    return "\n".join(out)


def state(ws: Path) -> dict:
    """What the workspace holds: HEAD, every file's bytes (outside .git and .duet)."""
    head = subprocess.run(["git", "-C", str(ws), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    files = {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*"))
             if p.is_file() and ".git" not in p.relative_to(ws).parts and ".duet" not in p.relative_to(ws).parts}
    return {"head": head, "files": files}


def _record(i: int, text: str) -> dict:
    return {"id": f"leak-{i}", "messages": [{"role": "user", "content": f"note {i}: {text}"},
                                             {"role": "assistant", "content": "noted"}],
            "metadata": {"category": "facts"}}


def _files(tmp: Path, kind: str, text: str) -> list[tuple[str, Path]]:
    """The same secret in four files a user may have: UTF-8, latin-1 (one non-UTF-8 byte), UTF-16, gzip."""
    base = PERSONA.read_text(encoding="utf-8")
    line = json.dumps(_record(0, text))
    out = []
    p = tmp / "utf8.jsonl"
    p.write_text(base + line + "\n", encoding="utf-8")
    out.append(("utf-8", p))
    p = tmp / "latin1.jsonl"
    p.write_bytes(base.encode() + line.replace("note 0", "caf\u00e9 0").encode("latin-1") + b"\n")
    out.append(("latin-1", p))
    p = tmp / "utf16.jsonl"
    p.write_bytes((base + line + "\n").encode("utf-16"))
    out.append(("utf-16", p))
    p = tmp / "data.jsonl.gz"
    p.write_bytes(gzip.compress((base + line + "\n").encode()))
    out.append(("gzip", p))
    return out


@pytest.fixture
def setup(tmp_path, fresh_db):
    ws = tmp_path / "ws"
    bare = tmp_path / "remote.git"
    env = {"DUET_POSTGRES_URL": fresh_db["postgres_url"], "DUET_MONGO_URL": fresh_db["mongo_url"]}
    r = duet("session", "start", "secrets", "-w", str(ws), env=env)
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    subprocess.run(["git", "clone", "-q", "--bare", str(ws), str(bare)], check=True)
    subprocess.run(["git", "-C", str(ws), "remote", "add", "origin", str(bare)], check=True)
    assert duet("memory", "sync", "-w", str(ws), env=env).returncode == 0
    return ws, bare, env, sid


@pytest.mark.parametrize("kind,text,value", SECRETS, ids=[s[0] for s in SECRETS])
def test_a_secret_in_any_form_never_reaches_the_remote_or_the_stores(setup, tmp_path, kind, text, value):
    ws, bare, env, sid = setup
    text = text.replace("\\n", "\n")
    before = state(ws)
    for enc, f in _files(tmp_path, kind, text):
        r = duet("data", "curate", str(f), "--name", "leaky", "-w", str(ws), env=env)
        assert r.returncode == 2, (enc, r.stderr)  # scanned before it is parsed, whatever its encoding
        assert f"{f.name}" in r.stderr and "secret" in r.stderr, r.stderr
        assert value not in r.stderr + r.stdout  # the message names the place and kind, never the value
    for cmd in (["session", "log", sid, "--role", "user", "--", text], ["session", "note", sid, "--", text],
                ["session", "decide", sid, "use the cache", f"--why={text}"], ["session", "state", sid, f"--next={text}"],
                ["memory", "hypothesize", "--confidence", "0.5", "--session", sid, "--", text]):
        r = duet(*cmd, env={**env, "DUET_WORKSPACE": str(ws)})  # the workspace from the environment: "--" ends options
        assert r.returncode == 2, (cmd, r.stderr)
        assert value not in r.stderr + r.stdout
    assert state(ws) == before  # HEAD and every file as they were
    assert duet("memory", "sync", "-w", str(ws), env=env).returncode == 0
    assert value.encode() not in remote_bytes(bare)
    assert value not in store_text(env)
    assert value not in "".join(p.read_text(errors="replace") for p in (ws / "sessions").rglob("*") if p.is_file())


def test_a_commit_made_by_hand_with_a_secret_is_not_pushed(setup):
    ws, bare, env, sid = setup
    value = "Xk9-mUq2pLz-hand"
    (ws / "configs" / "notes.yaml").write_text(f"db: postgresql://app:{value}@db.internal/app\n")
    subprocess.run(["git", "-C", str(ws), "add", "configs/notes.yaml"], check=True)
    subprocess.run(["git", "-C", str(ws), "commit", "-qm", "by hand"], check=True)
    r = duet("memory", "sync", "-w", str(ws), env=env)
    assert r.returncode == 2 and "configs/notes.yaml:1" in r.stderr and "push" in r.stderr, r.stderr
    assert value.encode() not in remote_bytes(bare)


def test_adopting_an_existing_folder_commits_only_duets_files(tmp_path, fresh_db):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / ".env").write_text("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzqKEY42\n")
    (folder / "diary.md").write_text("my own notes\n")
    (folder / ".gitignore").write_text("*.log\n")
    r = duet("session", "start", "here", "-w", str(folder))
    assert r.returncode == 0, r.stderr
    tracked = set(subprocess.run(["git", "-C", str(folder), "ls-files"], capture_output=True, text=True).stdout.split())
    assert tracked == {".gitattributes", ".gitignore", "duet.yaml", "configs/.gitkeep", "datasets/.gitkeep",
                       "runs/.gitkeep", "sessions/.gitkeep"}
    assert (folder / ".gitignore").read_text().startswith("*.log\n.duet/")  # the user's line kept, duet's added
    assert (folder / ".env").exists() and (folder / "diary.md").read_text() == "my own notes\n"


def test_a_false_positive_is_allowed_by_its_fingerprint(tmp_path):
    ws = tmp_path / "ws"
    data = tmp_path / "d.jsonl"
    lines = PERSONA.read_text().splitlines()
    data.write_text("\n".join(lines + [json.dumps(_record(1, "the example key is AKIAZ7QXRWPLMN3VBT4K"))]) + "\n")
    r = duet("data", "curate", str(data), "--name", "d", "-w", str(ws))
    assert r.returncode == 2
    fp = r.stderr.split("fingerprint ")[1].split(")")[0]
    assert not ws.exists()  # refused before anything was created
    Workspace(ws).init()
    (ws / "duet.yaml").write_text((ws / "duet.yaml").read_text() + f"allowed_secrets:\n  - {fp}\n")
    r = duet("data", "curate", str(data), "--name", "d", "-w", str(ws))
    assert r.returncode == 0, r.stderr


def test_a_secret_in_a_commit_or_tag_message_is_not_pushed(setup):
    """Push scans commit messages and the annotated tags --follow-tags would push, not only files."""
    ws, bare, env, sid = setup
    value = "ghp_" + "Z8q" * 12
    subprocess.run(["git", "-C", str(ws), "commit", "-q", "--allow-empty", "-m", f"deploy with {value}"], check=True)
    before = subprocess.run(["git", "-C", str(bare), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    r = duet("memory", "sync", "-w", str(ws), env=env)
    assert r.returncode == 2 and "its message" in r.stderr and value not in r.stderr, r.stderr
    subprocess.run(["git", "-C", str(ws), "reset", "-q", "--hard", "HEAD~1"], check=True)
    subprocess.run(["git", "-C", str(ws), "tag", "-a", "v1", "-m", f"release token {value}"], check=True)
    r = duet("memory", "sync", "-w", str(ws), env=env)
    assert r.returncode == 2 and "tag v1" in r.stderr, r.stderr
    assert value.encode() not in remote_bytes(bare)
    assert subprocess.run(["git", "-C", str(bare), "rev-parse", "HEAD"], capture_output=True, text=True).stdout == before


def test_a_scanner_that_cannot_load_is_a_refusal(setup, tmp_path):
    """detect-secrets failing to import refuses (exit 2, naming it); nothing is written unscanned."""
    ws, bare, env, sid = setup
    shadow = tmp_path / "shadow" / "detect_secrets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('broken install')\n")
    pp = os.pathsep.join([str(shadow.parent), str(Path(__file__).resolve().parents[2])])
    r = duet("session", "note", sid, "--", "a harmless note", env={**env, "DUET_WORKSPACE": str(ws), "PYTHONPATH": pp})
    assert r.returncode == 2 and "detect-secrets" in r.stderr, r.stderr
