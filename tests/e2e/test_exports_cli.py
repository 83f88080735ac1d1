"""Issue 14 acceptance, as a user runs it: `duet data import FILE --format auto -o out.jsonl` on each
export shape, then `duet data check out.jsonl`, both exit 0, and no citation marker, private-use
character, tool call or mojibake is left in the text."""

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
EXP = Path(__file__).resolve().parents[1] / "fixtures" / "exports"
LEFTOVERS = re.compile("[\ue000-\uf8ff]|【[^】]*†|\\bcite(?:turn\\d)|<tool_call|<tool_response|tool_use|"
                       "All the files uploaded|â€|Ã[©¨¢]|Ð[\x80-\xbf¿°-¹]|—Ä|–∞|–µ|UID:|\\[!nexus")


def duet(*args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name, fmt", [("decorated.md", "markdown"), ("obsidian_nexus.md", "markdown"),
                                       ("chatgpt_conversations.json", "chatgpt"),
                                       ("claude_conversations.json", "claude"), ("bom_crlf.jsonl", "jsonl"),
                                       ("chatgpt-export.zip", "chatgpt")])
def test_import_auto_then_check_leaves_clean_text(tmp_path, name, fmt):
    src = EXP / name
    if name.endswith(".zip"):
        src = tmp_path / name
        with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.write(EXP / "chatgpt_conversations.json", "conversations.json")
    out = tmp_path / "out.jsonl"
    r = duet("data", "import", src, "--format", "auto", "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"format {fmt} (detected:" in r.stderr
    r = duet("data", "check", out)
    assert r.returncode == 0, r.stderr + r.stdout
    for line in out.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        for m in rec["messages"]:
            assert not LEFTOVERS.search(m["content"]), (rec["id"], m["content"])
        assert [m["role"] for m in rec["messages"]][-1] == "assistant"
        assert next(m["role"] for m in rec["messages"] if m["role"] != "system") == "user"


def test_import_of_a_file_that_is_no_export_exits_1_and_writes_nothing(tmp_path):
    src = tmp_path / "notes.md"
    src.write_text("# Groceries\n\n- eggs\n- milk\n")
    r = duet("data", "import", src, "-o", tmp_path / "out.jsonl")
    assert r.returncode == 1 and "no speaker labels found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.md"]
