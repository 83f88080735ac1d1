"""Property-based: random bytes and random JSON/YAML shapes fed to every parser and importer end in
the parser's own clean error (or a result), never in another exception, and write no file."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory_sync.backup import BackupError, read_bundle
from memory_sync.log import EventError, read_events, read_meta
from memory_sync.secret_scan import SecretFound
from training.data.schema import DatasetError, check_records, read_jsonl, scan_jsonl
from training.data.importers import EXPORTS, FORMATS, ImportFormatError, import_file, import_to
from training.plan.memory_model import ModelProfile
from training.config import PlanError, load_config, load_plan_file, load_run_config
from training.config import Thresholds

SETTINGS = settings(max_examples=int(os.environ.get("DUET_FUZZ_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_DIRS: list[Path] = []

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=12), kids, max_size=6)), max_leaves=30)
# shapes that look like what the importers and configs expect, with wrong types inside
KEYS = ["id", "messages", "role", "content", "conversations", "from", "value", "instruction", "output", "input",
        "mapping", "current_node", "message", "author", "parts", "parent", "prompt", "chosen", "rejected",
        "train", "run_id", "model_ref", "dataset", "estimate", "name", "content_hash", "lora", "r", "max_steps",
        "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "data", "preset", "overrides",
        "format", "counts", "files", "sessions", "events",
        # ChatGPT and Claude exports
        "content_type", "recipient", "metadata", "is_visually_hidden_from_conversation", "thoughts", "summary",
        "text", "children", "conversation_id", "title", "create_time", "uuid", "chat_messages", "sender", "type",
        "thinking", "attachments", "extracted_content", "parent_message_uuid", "file_name", "tool_use", "tool_result"]
shaped = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.sampled_from(KEYS), kids, max_size=6)), max_leaves=25)


def _no_new_files(folder: Path, before: set) -> None:
    assert {p.name for p in folder.iterdir()} == before


def _run(fn, folder: Path, allowed: tuple):
    before = {p.name for p in folder.iterdir()}
    try:
        fn()
    except allowed:
        pass
    _no_new_files(folder, before)


def _import_to(p: Path) -> None:
    """The streaming import writes its output, or on a refusal nothing (no temp file either)."""
    out = p.parent / "out.jsonl"
    try:
        res = import_to(p, out)
    except ImportFormatError:
        assert sorted(x.name for x in p.parent.iterdir()) == [p.name]
        return
    assert out.read_text(encoding="utf-8").strip()
    if res.format in EXPORTS:  # an export's records always pass `duet data check`
        assert check_records(read_jsonl(out)) == []
    out.unlink()


def _every_importer(p: Path) -> None:
    for fmt in FORMATS:
        _run(lambda: import_file(p, fmt), p.parent, (ImportFormatError,))
    _import_to(p)


def _config_parsers(data: bytes) -> Path:
    """Every config parser on ``data``; the config.json it wrote (for more checks in its folder)."""
    p = _file(data, "x.yaml")
    for fn in (load_config, load_plan_file, load_run_config):
        _run(lambda: fn(p), p.parent, (PlanError,))
    p = _file(data, "config.json")
    _run(lambda: ModelProfile.from_config(p), p.parent, (PlanError,))
    return p


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    while _DIRS:
        shutil.rmtree(_DIRS.pop(), ignore_errors=True)


def _file(data: bytes, name: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="duet-fuzz-"))
    _DIRS.append(d)
    p = d / name
    p.write_bytes(data)
    return p


def _as_bytes(value, how: str) -> bytes:
    if how == "json":
        return json.dumps(value).encode()
    if how == "jsonl":
        items = value if isinstance(value, list) else [value]
        return "".join(json.dumps(x) + "\n" for x in items).encode()
    return yaml.safe_dump(value, allow_unicode=True).encode()


@SETTINGS
@given(data=st.binary(max_size=2000))
def test_random_bytes_to_every_file_parser(data):
    for name in ("x.jsonl", "x.json", "x.md"):
        p = _file(data, name)
        _run(lambda: check_records(read_jsonl(p)), p.parent, (DatasetError,))
        _run(lambda: scan_jsonl(p), p.parent, (DatasetError,))
        _every_importer(p)
    p = _config_parsers(data)
    p = _file(data, "b.tar.gz")
    _run(lambda: read_bundle(p), p.parent, (BackupError, SecretFound))
    p = _file(data, "events.jsonl")
    _run(lambda: read_events(p), p.parent, (EventError,))
    p = _file(data, "session.json")
    _run(lambda: read_meta(p), p.parent, (EventError,))


@SETTINGS
@given(value=st.one_of(json_values, shaped), how=st.sampled_from(["json", "jsonl", "yaml"]))
def test_random_json_and_yaml_shapes_to_every_parser(value, how):
    try:
        data = _as_bytes(value, how)
    except (ValueError, yaml.YAMLError):  # a shape the serializer itself refuses (e.g. NaN keys)
        return
    for name in ("x.jsonl", "conversations.json"):
        p = _file(data, name)
        _run(lambda: check_records(read_jsonl(p)), p.parent, (DatasetError,))
        _every_importer(p)
    p = _config_parsers(data)
    if isinstance(value, dict):
        _run(lambda: ModelProfile.from_config(value), p.parent, (PlanError,))
        _run(lambda: Thresholds.from_train({"watchdog": value}), p.parent, (ValueError,))


@SETTINGS
@given(value=shaped)
def test_random_event_lines_and_session_files(value):
    p = _file((json.dumps(value) + "\n").encode(), "events.jsonl")
    _run(lambda: read_events(p), p.parent, (EventError,))
    p = _file(json.dumps(value).encode(), "session.json")
    _run(lambda: read_meta(p), p.parent, (EventError,))


@pytest.mark.parametrize("value", [{"temperature_c": "hot"}, {"stall_seconds": float("inf")}, {"nope": 1},
                                   {"grad_norm_patience": 1.5}, {"thermal_pause": "yes"}])
def test_watchdog_thresholds_refuse_bad_values(value):
    with pytest.raises(ValueError):
        Thresholds.from_train({"watchdog": value})


@SETTINGS
@given(data=st.binary(max_size=3000), text=st.text(max_size=300))
def test_the_scanner_reads_anything_and_session_texts_are_checked(data, text):
    from memory_sync.memory import Memory
    from memory_sync.secret_scan import Scanner
    from memory_sync.workspace import Workspace

    sc = Scanner()
    sc.scan_bytes(data, "random")
    sc.scan_text(text, "text")
    root = _file(b"", "placeholder").parent / "ws"
    Workspace(root).init()
    m = Memory(root, None, None)
    s = m.start_session("fuzz")
    before = s.events_path.read_bytes()
    try:
        m.turn(s.id, "user", text)
    except (EventError, SecretFound):
        assert s.events_path.read_bytes() == before


SPEAKER_LINES = ["## User", "## Assistant", "## 👤 **RAF**", "## 🤖 **GPT**", "## 🌀 **Tool**", "**User:** hi",
                 "**Assistant:**", ">[!nexus_user] **User** - 18.06.2025 at 21:26", ">[!nexus_agent] **Assistant**",
                 "> quoted", "---", "```", "# Title", "<!-- UID: 1 -->", "### 18.06.2025", "【6†source】", "\ue200cite\ue202x\ue201",
                 "—Ä–∞–∑ –¥–≤–∞ —Ç—Ä–∏", "Ã©tÃ©", "<think>", "</think>", "## System", "**Tool:** x", ">[!nexus_attachment] f"]


@SETTINGS
@given(lines=st.lists(st.one_of(st.sampled_from(SPEAKER_LINES), st.text(max_size=40)), max_size=30))
def test_random_markdown_transcripts_import_cleanly_or_refuse(lines):
    p = _file("\n".join(lines).encode("utf-8", "surrogatepass"), "chat.md")
    _run(lambda: import_file(p, "markdown"), p.parent, (ImportFormatError,))
    _import_to(p)


ADVERSARIAL = ["1-", " ", "**", "#", "<!--", " at 1", "( 1", "- ", "turn1a1", "\ue202", "【", "1:", "_"]


@SETTINGS
@given(lines=st.lists(st.tuples(st.sampled_from(["", "# ", "**", "> [!x] ", "- ", "User: "]),
                                st.sampled_from(ADVERSARIAL), st.integers(100, 5000),
                                st.sampled_from(["", "!", "**", ":", " -->"])), min_size=1, max_size=4))
def test_markdown_built_to_backtrack_imports_within_bounds(lines):
    """Long runs of the characters the Markdown patterns share: refused or imported in bounded time."""
    import time

    text = "\n".join(pre + unit * n + tail for pre, unit, n, tail in lines) + "\nUser: hi\nAssistant: hello\n"
    p = _file(text.encode(), "chat.md")
    t = time.time()
    _run(lambda: import_file(p, "markdown"), p.parent, (ImportFormatError,))
    assert time.time() - t < 5, [(pre, unit, n) for pre, unit, n, _ in lines]


@SETTINGS
@given(members=st.lists(st.tuples(st.sampled_from(["conversations.json", "a/conversations.json", "../conversations.json",
                                                   "/abs/conversations.json", "x.txt"]),
                                  st.one_of(st.binary(max_size=300), st.sampled_from([b"[" * 20000, b"[]", b"[{}]"])),
                                  st.sampled_from([0, 8, 12, 14]), st.sampled_from([0, 1, 9, 99])),
                        min_size=1, max_size=3))
def test_random_zips_import_cleanly_or_refuse_within_bounds(members):
    """Zip archives with random members, methods, flags and names (traversal, encryption bits, Deflate64):
    a clean ImportFormatError or a result, within time, writing nothing on a refusal."""
    import io
    import time
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, method, _ in members:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    raw = bytearray(buf.getvalue())
    i = 0
    for _, _, _, patch in members:  # what other zippers write: an encryption flag, another method
        i = raw.find(b"PK\x03\x04", i)
        if patch == 1:
            raw[i + 6] |= 1
        elif patch in (9, 99):
            raw[i + 8:i + 10] = patch.to_bytes(2, "little")
        i += 4
    p = _file(bytes(raw), "export.zip")
    t = time.time()
    _run(lambda: import_file(p), p.parent, (ImportFormatError,))
    _import_to(p)
    assert time.time() - t < 10
