"""Hostile and mistaken input, through the CLI as a user runs it: every case exits with the documented
code (1 invalid input, 2 refused), names what is wrong, prints no traceback, and changes nothing
stored (git HEAD, every file's bytes, store counts)."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
PERSONA = REPO / "examples/persona/persona.jsonl"
TINY = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}


def duet(*args, env=None, stdin=None, cwd=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), "DUET_EMBEDDER": "hashing", **(env or {})}
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=180, env=e, input=stdin, cwd=cwd)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def snapshot(root: Path) -> dict:
    """HEAD and the sha256 of every file under ``root`` (a missing root is {"exists": False})."""
    if not root.exists():
        return {"exists": False}
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "-q", "--verify", "HEAD"], capture_output=True,
                          text=True).stdout.strip() if (root / ".git").exists() else None
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
             if p.is_file() and not p.is_symlink() and ".git" not in p.relative_to(root).parts[:1]}
    return {"exists": True, "head": head, "files": files}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with a curated dataset, a session and a plan the architect wrote (tiny Qwen2 shape)."""
    from roles.architect import Architect

    root = tmp_path_factory.mktemp("hostile") / "ws"
    arch = Architect(str(root), session_title="hostile")
    ds = arch.curate([str(PERSONA)], "persona")
    hw = {"hostname": "h", "device": "cpu", "gpu_name": None, "gpu_total_bytes": 0, "ram_total_bytes": 24 * 2**30,
          "ram_available_bytes": 20 * 2**30, "cpu_count": 2, "bf16": False, "disk_free_bytes": 10**11}
    from dataclasses import fields

    from training.plan.hardware import HardwareProfile

    hw = {**{f.name: None for f in fields(HardwareProfile)}, **hw}
    plan = arch.design_plan("demo", hw, TINY, "tiny", ds, {"max_steps": 4})
    sid = arch.session_id
    arch.commit_session()
    arch.close()
    return {"root": root, "plan": root / "configs" / f"{plan['run_id']}.yaml", "run_id": plan["run_id"], "sid": sid}


def refused(r, code: int, *words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, (w, r.stderr)


# -- paths stay inside their roots ------------------------------------------------------------------

def test_run_ids_from_a_plan_or_the_command_line_cannot_escape_the_runs_folder(ws, tmp_path):
    root = ws["root"]
    before = snapshot(root)
    bad = yaml.safe_load(ws["plan"].read_text())
    bad["run_id"] = "../../../../escaped-run"
    evil = root / "configs" / "evil.yaml"
    evil.write_text(yaml.safe_dump(bad))
    refused(duet("train", evil, "-w", root), 1, "run id '../../../../escaped-run'")
    refused(duet("train", ws["plan"], "--run-id", "../../x", "-w", root), 1, "run id '../../x'")
    refused(duet("train", ws["plan"], "--run-id", "", "-w", root), 1, "run id ''")
    refused(duet("merge", "../../x", "-w", root), 1, "run id '../../x'")
    evil.unlink()
    assert snapshot(root) == before
    assert not list(tmp_path.parent.rglob("escaped-run"))


def test_session_ids_and_dataset_names_are_names_not_paths(ws, tmp_path):
    root = ws["root"]
    before = snapshot(root)
    refused(duet("session", "log", "", "--role", "user", "hi", "-w", root), 1, "give a session id")
    refused(duet("session", "log", "../../x", "--role", "user", "hi", "-w", root), 1, "session id '../../x'")
    refused(duet("session", "show", "..", "-w", root), 1, "session id '..'")
    refused(duet("data", "curate", PERSONA, "--name", "../escape", "-w", root), 1, "dataset name '../escape'")
    assert snapshot(root) == before


def test_a_symlink_that_leads_out_of_its_folder_is_refused(tmp_path):
    link = tmp_path / "data.jsonl"
    link.symlink_to("/etc/passwd")
    r = duet("data", "curate", link, "--name", "x", "-w", tmp_path / "ws")
    refused(r, 1, "a symlink to /etc/passwd")
    assert not (tmp_path / "ws").exists()


# -- a file that is not the format it claims is refused whole ----------------------------------------

@pytest.mark.parametrize("content", [
    Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"root:x:0:0:root:/root:/bin/bash\n",
    bytes(range(256)) * 64,
    b"id,messages\n1,hello\n",
    b'{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n[1, 2]\n',
], ids=["passwd", "binary", "csv", "json-list-line"])
def test_a_foreign_file_is_refused_whole_and_nothing_of_it_is_stored(tmp_path, content):
    f = tmp_path / "foreign.jsonl"
    f.write_bytes(content)
    r = duet("data", "curate", f, "--name", "x", "-w", tmp_path / "ws")
    refused(r, 1, "foreign.jsonl")
    assert not (tmp_path / "ws").exists()  # no workspace, no quarantine.jsonl with the file's lines
    r = duet("data", "check", f)
    assert r.returncode == 1


def test_bom_and_crlf_jsonl_is_accepted(tmp_path):
    f = tmp_path / "windows.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + PERSONA.read_bytes().replace(b"\n", b"\r\n"))
    r = duet("data", "check", f)
    assert r.returncode == 0, r.stderr


# -- one validation for every entry point ---------------------------------------------------------------

PLAN_MUTATIONS = [  # (path in the plan, value, words in the message)
    (("train", "lora", "r"), 0, "lora.r"),
    (("train", "max_steps"), 0, "max_steps"),
    (("train", "learning_rate"), -1, "learning_rate"),
    (("train", "micro_batch"), -4, "micro_batch"),
    (("train", "micro_batch"), "4", "micro_batch"),
    (("train", "grad_norm_limit"), float("inf"), "grad_norm_limit"),
    (("train", "learning_rate"), float("nan"), "learning_rate"),
    (("train", "watchdog"), {"temperature_c": "hot"}, "temperature_c"),
    (("train", "init_from"), "../../other", "init_from"),
    (("train",), [1, 2], "train"),
    (("dataset", "name"), "../../etc", "dataset"),
    (("dataset", "content_hash"), "zz", "content_hash"),
    (("device",), "tpu", "device"),
    (("surprise",), 1, "surprise"),
]


@pytest.mark.parametrize("path,value,words", PLAN_MUTATIONS, ids=[".".join(m[0]) + f"={m[1]!r}" for m in PLAN_MUTATIONS])
def test_duet_train_validates_the_whole_plan_before_creating_a_run(ws, path, value, words):
    root = ws["root"]
    plan = yaml.safe_load(ws["plan"].read_text())
    node = plan
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    f = root / "configs" / "mutated.yaml"
    f.write_text(yaml.safe_dump(plan, sort_keys=False))
    before = snapshot(root)
    refused(duet("train", f, "-w", root), 1, words, "mutated.yaml")
    assert snapshot(root) == before
    assert not (root / ".duet" / "executor" / "runs" / plan["run_id"]).exists()
    f.unlink()


def test_duplicate_yaml_keys_are_an_error_with_their_line(ws, tmp_path):
    text = ws["plan"].read_text().replace("  seed: 42\n", "  seed: 42\n  seed: 43\n")
    f = tmp_path / "dup.yaml"
    f.write_text(text)
    refused(duet("train", f, "-w", ws["root"]), 1, "key 'seed' appears twice")
    preset = tmp_path / "preset.yaml"
    preset.write_text("name: p\nmax_steps: 10\nmax_steps: 20\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    refused(duet("plan", "--model", cfg, "--gpu-mem", "24GiB", "--preset", preset), 1, "preset.yaml:3", "appears twice")


@pytest.mark.parametrize("args,words", [
    (["--seq-len", "0"], "seq_len"),
    (["--batch", "0"], "micro_batch"),
    (["--gpu-mem", "0GiB"], "above 0"),
    (["--gpu-mem", "nanGiB"], "size"),
], ids=["seq-len-0", "batch-0", "gpu-mem-0", "gpu-mem-nan"])
def test_cli_overrides_go_through_the_same_model_and_zero_is_a_value(tmp_path, args, words):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    full = ["plan", "--model", cfg, "--gpu-mem", "24GiB", *args] if "--gpu-mem" not in args else \
        ["plan", "--model", cfg, *args]
    refused(duet(*full), 1, words)


@pytest.mark.parametrize("change,words", [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_hidden_layers": -2}, "num_hidden_layers"),
    ({"hidden_size": True}, "hidden_size"),
    ({"vocab_size": "1000"}, "vocab_size"),
    ({"hidden_size": 65}, "divisible"),
], ids=["zero-heads", "negative-layers", "bool-hidden", "string-vocab", "indivisible"])
def test_model_config_shapes_must_be_positive_whole_numbers(tmp_path, change, words):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TINY, **change}))
    refused(duet("plan", "--model", cfg, "--gpu-mem", "24GiB"), 1, words)


@pytest.mark.parametrize("text,words", [
    ("[1, 2]\n", "expected a run config"),
    ("data: d.jsonl\nbogus: 1\n", "bogus"),
    ("data: ../../../etc/passwd\n", "leads out of"),
    ("data: d.jsonl\ntest_frac: .nan\n", "test_frac"),
    ("data: d.jsonl\noverrides:\n  max_steps: 0\n", "max_steps"),
    ("data: d.jsonl\noverrides: [1]\n", "overrides"),
    ("data: d.jsonl\ndataset: ../x\n", "dataset"),
    ("data: d.jsonl\ndata: e.jsonl\n", "appears twice"),
    ("data: d.jsonl\noverrides:\n  report_to: [neptune]\n", "report_to"),
    ("data: d.jsonl\noverrides:\n  report_to: mlflow\n  tracking: {mlflow: {tracking_uri: 'localhost:5000'}}\n",
     "tracking.mlflow.tracking_uri"),
    ("data: d.jsonl\noverrides:\n  report_to: [mlflow]\n  tracking: {mlflow: {tracking_uri: 'http://u:pw@h:5000'}}\n",
     "MLFLOW_TRACKING_USERNAME"),
    ("data: d.jsonl\noverrides:\n  tracking: {wandb: {mode: cloud}}\n", "tracking.wandb.mode"),
    ("data: d.jsonl\noverrides:\n  tracking: {comet: {}}\n", "comet"),
], ids=["list", "unknown", "escape", "nan", "zero-steps", "list-overrides", "dataset-path", "dup", "tracker",
        "tracker-uri", "tracker-credentials", "wandb-mode", "tracker-settings"])
def test_run_configs_are_validated_before_anything_starts(tmp_path, text, words):
    (tmp_path / "d.jsonl").write_bytes(PERSONA.read_bytes())
    f = tmp_path / "run.yaml"
    f.write_text(text)
    refused(duet("run", f, "-w", tmp_path / "ws"), 1, words)
    assert not (tmp_path / "ws").exists()


# -- refusal changes nothing: restore, import, commands on a folder that is no workspace ----------------

def _bundle(tmp_path: Path, ws: dict, edit) -> Path:
    src = tmp_path / "good.tar.gz"
    if not src.exists():
        assert duet("memory", "backup", src, "-w", ws["root"]).returncode == 0
    with tarfile.open(src) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    manifest = json.loads(members.pop("manifest.json"))
    raw = edit(members, manifest)
    out = tmp_path / "edited.tar.gz"
    with tarfile.open(out, "w:gz") as t:
        if raw is None:
            manifest["files"] = {k: {"sha256": hashlib.sha256(v).hexdigest(), "bytes": len(v)} for k, v in members.items()}
            raw = json.dumps(manifest).encode()
        import io

        for name, data in [("manifest.json", raw), *members.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out


def _sj(members):
    return next(k for k in members if k.endswith("session.json"))


EDITS = {
    "missing-counts": (lambda m, man: man.pop("counts") and None, "counts"),
    "wrong-counts": (lambda m, man: man["counts"].update(events=man["counts"]["events"] + 5), "the files hold"),
    "session-json-not-json": (lambda m, man: m.update({_sj(m): b"not json"}), "session.json"),
    "list-manifest": (lambda m, man: b"[1, 2, 3]", "not an object"),
    "truncated-manifest": (lambda m, man: json.dumps(man).encode()[:40], "not JSON"),
    "nan-in-manifest": (lambda m, man: json.dumps(man).replace('"events": ', '"events": NaN, "x": ', 1).encode(),
                        "NaN"),
    "member-escapes": (lambda m, man: m.update({"sessions/../../evil": b"x"}), "refusing member"),
    "unknown-member": (lambda m, man: m.update({"cortex/x; DROP TABLE events.jsonl": b""}), "refusing member"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_a_bad_backup_is_refused_before_anything_is_written(ws, tmp_path, name):
    edit, words = EDITS[name]
    bundle = _bundle(tmp_path, ws, edit)
    new = tmp_path / "new-ws"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "mine.txt").write_text("keep me\n")
    before = snapshot(plain)
    refused(duet("memory", "restore", bundle, "-w", new), 1, words)
    assert not new.exists()
    refused(duet("memory", "restore", bundle, "-w", plain), 1, words)
    assert snapshot(plain) == before and not (plain / ".git").exists()


def test_a_good_backup_restores_and_a_truncated_one_does_not(ws, tmp_path):
    _bundle(tmp_path, ws, lambda m, man: None)
    good = tmp_path / "good.tar.gz"
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(duet("memory", "restore", cut, "-w", tmp_path / "x"), 1, "not a whole duet backup")
    assert not (tmp_path / "x").exists()
    r = duet("memory", "restore", good, "-w", tmp_path / "y", "--json")
    assert r.returncode == 0, r.stderr
    assert duet("session", "list", "-w", tmp_path / "y").returncode == 0


def test_import_onto_its_own_input_is_refused(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(PERSONA.read_bytes())
    refused(duet("data", "import", f, "-o", f), 1, "the input file itself")
    (tmp_path / "link.jsonl").symlink_to(f)
    refused(duet("data", "import", f, "-o", tmp_path / "link.jsonl"), 1, "the input file itself")
    assert f.read_bytes() == PERSONA.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "x.jsonl"]  # no temp file left


@pytest.mark.parametrize("cmd", [
    ["session", "log", "01abc", "--role", "user", "hi"], ["session", "list"], ["session", "resume", "01abc"],
    ["memory", "sync"], ["memory", "search", "x"], ["memory", "backup", "out.tar.gz"],
], ids=lambda c: " ".join(c[:2]))
def test_a_command_on_a_folder_that_is_no_workspace_leaves_no_repository(tmp_path, cmd):
    folder = tmp_path / "plain"
    folder.mkdir()
    refused(duet(*cmd, "-w", folder, cwd=tmp_path), 1, "not a duet workspace")
    assert list(folder.iterdir()) == [] and not (tmp_path / "out.tar.gz").exists()


# -- no tracebacks: inputs that used to crash ---------------------------------------------------------

def test_inputs_that_used_to_end_in_a_traceback_are_clean_errors(ws, tmp_path):
    root = ws["root"]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50000 + "]" * 50000)
    refused(duet("data", "import", deep, "-o", tmp_path / "o.jsonl"), 1, "nested deeper")
    refused(duet("data", "check", deep), 1)
    chatgpt = tmp_path / "conversations.json"
    chatgpt.write_text(json.dumps([{"mapping": {"a": [1]}, "current_node": "a"},
                                   {"mapping": {"a": {"message": {"author": "user", "content": 5}, "parent": 7}},
                                    "current_node": "a"},
                                   {"mapping": [], "current_node": None}]))
    refused(duet("data", "import", chatgpt, "-o", tmp_path / "o.jsonl", "--format", "chatgpt"), 1, "no record")
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"id": "s", "messages": [{"role": "user", "content": "\\ud800"}, '
                         '{"role": "assistant", "content": "ok"}]}\n')
    refused(duet("data", "check", surrogate), 1, "lone surrogate")
    refused(duet("session", "decide", ws["sid"], "-w", root, stdin=""), 1, "non-empty text")
    refused(duet("session", "decide", ws["sid"], "x", "--why", "", "-w", root), 1, "why")
    big = "x" * 1_100_000
    refused(duet("session", "log", ws["sid"], "--role", "user", "-w", root, stdin=big), 1, "above the limit")
    refused(duet("session", "show", ws["sid"], "--range", "0:5", "-w", root), 1, "--range")
    refused(duet("memory", "hypothesize", "x", "--confidence", "nan", "-w", root), 1, "confidence")
    refused(duet("data", "curate", PERSONA, "--name", "p", "--reasoning-target", "nan", "-w", root), 1,
            "reasoning-target")
    refused(duet("data", "curate", PERSONA, "--name", "p", "--test-frac", "0", "-w", root), 1, "test-frac")


# -- least privilege --------------------------------------------------------------------------------------

def test_the_token_folder_is_private_and_embedded_postgres_needs_its_password(tmp_path, stores):
    import psycopg

    cfg = tmp_path / "config"
    from cluster import auth

    os.environ["DUET_CONFIG_DIR"], old = str(cfg), os.environ.get("DUET_CONFIG_DIR")
    try:
        path, created = auth.ensure_token()
    finally:
        os.environ["DUET_CONFIG_DIR"] = old
    assert created and stat.S_IMODE(cfg.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    port = stores["postgres"].port
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5)
    with psycopg.connect(stores["postgres"].url, connect_timeout=5) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    sd = stores["state_dir"]
    assert stat.S_IMODE((sd / "services.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((sd / "postgres.password").stat().st_mode) == 0o600
    assert stat.S_IMODE((sd / "mongo").stat().st_mode) == 0o700
