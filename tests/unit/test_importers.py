import json
from pathlib import Path


from cluster.cli import main
from training.data.schema import check_records, read_jsonl
from training.data.importers import import_file

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def test_chatgpt_export_follows_the_current_branch_only():
    res = import_file(FIX / "chatgpt_conversations.json")
    assert res.format == "chatgpt" and res.detected
    assert len(res.records) == 1 and len(res.skipped) == 1  # the empty chat is reported, not silently dropped
    rec = res.records[0]
    assert rec["id"] == "c0ffee00-0001" and rec["metadata"]["title"] == "Tank sensor firmware"
    roles = [m["role"] for m in rec["messages"]]
    text = " ".join(m["content"] for m in rec["messages"])
    assert roles == ["user", "assistant", "user", "assistant"]
    assert "units" in text and "Divide before scaling" in text
    assert "first draft" not in text and "abandoned" not in text and "tool output" not in text


def test_markdown_transcript_with_emoji_code_and_several_styles():
    res = import_file(FIX / "transcript.md")
    assert res.format == "markdown"
    talk, chat = res.records
    assert talk["metadata"]["title"] == "Planning the Hobart talk"
    assert [m["role"] for m in talk["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "🐙" in talk["messages"][0]["content"] and "🦑" in talk["messages"][1]["content"]
    assert "# ## User  <- inside code" in talk["messages"][3]["content"]  # code blocks are not split
    assert talk["messages"][3]["content"].startswith("```python")
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user", "assistant"]
    assert chat["messages"][1]["content"] == "Yes, the probe was replaced this morning ✅"
    assert chat["messages"][2]["content"] == "and tank 3?"
    assert chat["messages"][3]["content"] == "Tank 3 is clean; salinity 35.1 ppt."


def test_sharegpt_alpaca_and_dpo():
    sg = import_file(FIX / "sharegpt.json")
    assert sg.format == "sharegpt" and len(sg.records) == 2 and "narrator" in sg.skipped[0]["reason"]
    assert sg.records[0]["messages"][0] == {"role": "system", "content": "You are Wren."}
    al = import_file(FIX / "alpaca.json")
    assert al.format == "alpaca"
    assert al.records[0]["messages"][0]["content"].endswith("switch faster.")
    assert [m["role"] for m in al.records[1]["messages"]] == ["user", "assistant"]
    dpo = import_file(FIX / "pairs.dpo.jsonl")
    assert dpo.format == "dpo" and len(dpo.records) == 3
    assert dpo.records[0]["prompt"] == [{"role": "user", "content": "Write a one-line status update."}]
    assert dpo.records[1]["prompt"][0]["role"] == "system"


def test_ids_are_stable_across_imports():
    a = import_file(FIX / "alpaca.json").records
    b = import_file(FIX / "alpaca.json").records
    assert [r["id"] for r in a] == [r["id"] for r in b]


def test_cli_import_then_check(tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert main(["data", "import", str(FIX / "transcript.md"), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "markdown" and doc["detected"] and doc["records"] == 2
    assert check_records(read_jsonl(out)) == []
    dpo_out = tmp_path / "dpo.jsonl"
    assert main(["data", "import", str(FIX / "pairs.dpo.jsonl"), "-o", str(dpo_out)]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(dpo_out), "--json"]) == 1  # pair-3 has chosen == rejected
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["line"], p["id"], p["field"]) for p in problems] == [(3, "pair-3", "rejected")]
    assert main(["data", "import", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.jsonl")]) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_every_importer_pattern_runs_in_linear_time_on_adversarial_text():
    """Each regex of the importers against 10k-character strings built to make backtracking explode
    (runs of the characters its quantifiers share, with a tail that fails the match): linear time.
    _DATE_TAIL is only ever run on a label of at most MAX_LABEL_SOURCE characters (checked below)."""
    import re
    import time

    from training.data.importers import markdown as md, text as tx

    pats = {f"{m.__name__}.{k}": v for m in (md, tx) for k, v in vars(m).items()
            if isinstance(v, re.Pattern) and k != "_DATE_TAIL"}
    units = [" ", "1", "-", "#", "*", "1 ", "1-", "1:", " at ", "**", "- ", "( 1", "turn1a1", "\ue202", "【", "<!--",
             "\n", "gpt-"]
    prefixes = ["", "# ", "**", "> [!", "- ", "\ue200"]

    def worst(n):
        out = {}
        for name, p in pats.items():
            t = time.perf_counter()
            for u in units:
                for pre in prefixes:
                    s = pre + u * (n // len(u)) + "!"
                    p.search(s)
                    p.match(s)
                    p.sub("", s)
            out[name] = time.perf_counter() - t
        return out

    small, big = worst(2500), worst(10000)
    for name in pats:
        assert big[name] < 2.0, (name, big[name])                       # seconds for all 108 strings
        assert big[name] < 8 * small[name] + 0.05, (name, small[name], big[name])  # 4x the text: ~4x the time
    label = "User " + "1-" * 5000 + "!"
    t = time.perf_counter()
    md._strip_decoration(label)
    assert time.perf_counter() - t < 0.5
