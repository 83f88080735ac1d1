"""Real chat-export shapes (issue 14): fixtures written in the shapes users' exports have (see
tests/fixtures/exports/build.py and the .md files there), imported with --format auto."""

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from cluster.cli import main
from training.data.schema import Record, check_records, read_jsonl
from training.data.importers import ImportFormatError, Options, import_file, import_to

EXP = Path(__file__).resolve().parents[1] / "fixtures" / "exports"
OLD = Path(__file__).resolve().parents[1] / "fixtures"
PUA = re.compile("[\ue000-\uf8ff]")
MOJIBAKE = re.compile(r"â€|Ã[\x80-\xbf©¨ª«®´]|Ð[\x80-\xbf¿°-¹]|Ñ[\x80-\x8f]|[–—][Ä-ÏÄÅÇÉÑÖÜáàâäãåçéèêëíìîïñóòôöõúùûü†°¢£§•¶ß®©™´¨≠ÆØ∞±≤≥¥µ∂∑∏π∫ªºΩæø]{1}[^\s]")


def texts(res) -> list[str]:
    return [m["content"] for r in res.records for m in r["messages"]]


def roles(rec) -> list[str]:
    return [m["role"] for m in rec["messages"]]


def assert_clean(all_text: list[str]) -> None:
    for t in all_text:
        assert not PUA.search(t), t
        assert "【" not in t and "†" not in t, t
        assert "<tool_call" not in t and "<tool_response" not in t, t
        assert not MOJIBAKE.search(t), t


def test_decorated_markdown_learns_the_speakers_and_keeps_long_turns_whole():
    res = import_file(EXP / "decorated.md")
    assert res.format == "markdown" and res.detected
    assert res.labels["h2 RAF"].startswith("user (learned") and res.labels["h2 GPT"] == "assistant"
    assert res.labels["h2 Tool"] == "tool" and len(res.labels) == 3
    (rec,) = res.records
    assert roles(rec) == ["user", "assistant", "user", "assistant"]
    assert rec["metadata"]["title"].startswith("Chat del 2025-07-23")
    answer = rec["messages"][1]["content"]
    # sub-headings, the table, the code block (with a speaker heading inside) and "## Summary" stay in the turn
    assert "### Week 1: cycling" in answer and "| 3 | Add bacteria | ammonia |" in answer
    assert "# ## 👤 **RAF**  <- inside code" in answer and answer.endswith("Cycle first, then stock slowly.")
    assert "## Summary" in answer and "\n---" not in answer
    assert "fully loaded" not in " ".join(texts(res))  # the tool turn is not the assistant's words
    assert res.changes["tool results dropped"] == 1 and res.changes["citation markers removed"] == 2
    assert_clean(texts(res))


def test_decorated_markdown_tool_turn_folds_on_request():
    res = import_file(EXP / "decorated.md", options=Options(tools="fold"))
    answer = res.records[0]["messages"][1]["content"]
    assert answer.startswith("<tool_response>\nAll the files uploaded") and "Sure, Raf." in answer


def test_labels_given_override_what_is_learned(tmp_path):
    f = tmp_path / "t.md"
    f.write_text("## Maya\nhello\n\n## Wren\nhi Maya\n\n## Maya\nhow are you?\n\n## Wren\nwell\n")
    res = import_file(f)
    assert roles(res.records[0]) == ["user", "assistant", "user", "assistant"]
    assert res.records[0]["messages"][0]["content"] == "hello"
    assert "first of two alternating" in res.labels["h2 Maya"]
    swapped = import_file(f, user_labels=("Wren",), assistant_labels=("Maya",))
    assert swapped.records[0]["messages"][0]["content"] == "hi Maya"  # Maya's opening line came before any user turn
    assert swapped.changes["turns before the first user turn dropped"] == 1


def test_obsidian_callouts_with_mojibake_are_repaired():
    res = import_file(EXP / "obsidian_nexus.md")
    (rec,) = res.records
    assert rec["id"] == "68529a3e-water-change" and rec["metadata"]["title"] == "Смена воды"
    assert roles(rec) == ["user", "assistant", "user", "assistant"]
    m = [x["content"] for x in rec["messages"]]
    assert m[0] == "Привет! Как часто менять воду в аквариуме?\n\nTank: 120 L."
    assert m[1].startswith("Раз в неделю меняйте 10 % воды.") and "> A quoted note inside the answer stays." in m[1]
    assert '```bash\necho "10%"\n```' in m[1]
    assert m[2] == "Très bien, merci — à bientôt !" and m[3] == "De rien ! Bonne journée."
    assert res.changes["turns repaired (mojibake)"] == 4
    joined = "\n".join(m)
    assert "UID" not in joined and "<!--" not in joined and "18.06.2025" not in joined and "[!nexus" not in joined
    assert_clean(m)


def test_mojibake_repair_can_be_turned_off():
    res = import_file(EXP / "obsidian_nexus.md", options=Options(repair=False))
    assert "–ü—Ä–∏–≤–µ—Ç" in res.records[0]["messages"][0]["content"]
    assert "turns repaired (mojibake)" not in res.changes


def test_chatgpt_export_as_exported_today():
    res = import_file(EXP / "chatgpt_conversations.json")
    assert res.format == "chatgpt" and res.detected
    by_id = {r["id"]: r for r in res.records}
    probe = by_id["6871a0e2-0001"]
    assert roles(probe) == ["user", "assistant", "user", "assistant"]
    assert probe["messages"][0]["content"] == "Why does my salinity probe drift after a week? Photo of the probe attached."
    a = probe["messages"][1]["content"]
    assert a.startswith("<think>\nBiofilm on the electrodes changes the cell constant.\n</think>\n\nMost drift")
    assert "YSI recommends" in a and "recalibrate against a fresh standard." in a
    assert "Old answer" not in " ".join(texts(res)) and "salinty" not in " ".join(texts(res))
    assert "Thought for" not in a and "search_query" not in a and "Biofouling of conductivity" not in a
    c = res.changes
    assert c["messages on branches not taken"] == 2 and c["hidden system and context messages skipped"] == 2
    assert c["images dropped"] == 2 and c["reasoning recaps dropped ('Thought for ...')"] == 1
    assert c["entity markers replaced by their name"] == 1 and c["citation markers removed"] >= 3
    assert c["attachments referenced (their content is not in the export)"] == 1
    plot = by_id["6871a0e2-0002"]
    assert [m["content"] for m in plot["messages"]][1::2] == [
        "Here is the chart: temperatures peak at 19.4 C on day 12.", "Here is your octopus 🐙."]
    sched = by_id["6871a0e2-0003"]
    assert roles(sched) == ["user", "assistant"] and all("<think>" not in m["content"] for m in sched["messages"])
    assert c["reasoning without an answer dropped"] == 1 and c["unanswered turns at the end dropped"] == 1
    assert res.skipped == [{"where": f"{EXP / 'chatgpt_conversations.json'}[3]",
                            "reason": "no user turn answered by the assistant"}]
    assert all(r["metadata"]["source"] == "chatgpt_conversations.json" for r in res.records)
    assert_clean(texts(res))


def test_chatgpt_tool_modes_fold_and_keep():
    fold = {r["id"]: r for r in import_file(EXP / "chatgpt_conversations.json", options=Options(tools="fold")).records}
    a = fold["6871a0e2-0002"]["messages"][1]["content"]
    assert '<tool_call name="python">\nimport pandas' in a and '<tool_response name="python">' in a
    assert a.endswith("Here is the chart: temperatures peak at 19.4 C on day 12.")
    assert "[image: 1024x1024]" in fold["6871a0e2-0002"]["messages"][3]["content"]
    keep = import_file(EXP / "chatgpt_conversations.json", options=Options(tools="keep"))
    plot = {r["id"]: r for r in keep.records}["6871a0e2-0002"]
    assert roles(plot) == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert plot["messages"][2]["content"] == "<Figure size 640x480 with 1 Axes>"
    for res in (keep,):
        assert check_records([Record("x", i + 1, r, json.dumps(r)) for i, r in enumerate(res.records)]) == []


def test_long_conversation_is_split_at_turn_boundaries():
    whole = {r["id"]: r for r in import_file(EXP / "chatgpt_conversations.json").records}["6871a0e2-0005"]
    res = import_file(EXP / "chatgpt_conversations.json", options=Options(max_len=1200))
    parts = [r for r in res.records if r["id"].startswith("6871a0e2-0005")]
    assert len(parts) > 2
    assert [p["id"] for p in parts] == [f"6871a0e2-0005-part{k}" for k in range(1, len(parts) + 1)]
    for k, p in enumerate(parts, start=1):
        assert p["messages"][0]["role"] == "user" and p["messages"][-1]["role"] == "assistant"
        assert p["metadata"]["part"] == k and p["metadata"]["parts"] == len(parts)
    assert [m for p in parts for m in p["messages"]] == whole["messages"]  # nothing lost, order kept
    assert res.changes["conversations split at turn boundaries (longer than --max-len)"] == 1


def test_claude_export():
    res = import_file(EXP / "claude_conversations.json")
    assert res.format == "claude" and res.detected
    by_id = {r["id"]: r for r in res.records}
    reef = by_id["c1a0de00-0001"]
    assert roles(reef) == ["user", "assistant", "user", "assistant"]
    assert reef["messages"][0]["content"] == "Here is my light log. What photoperiod do you suggest?"
    assert reef["messages"][1]["content"] == ("<think>\nTwelve hours now; corals like 10-12 with a ramp.\n</think>\n\n"
                                              "Keep 10 hours at full power with a one-hour ramp at each end.")
    assert reef["messages"][3]["content"] == ("Run the refugium on the reverse cycle, 20:00 to 08:00. Here is a timer "
                                              "script:\n\n**Refugium timer**\n\n```python\nON, OFF = 20, 8\nprint(ON, OFF)\n```")
    heater = by_id["c1a0de00-0002"]
    assert "retried away" not in json.dumps(heater) and "Two 150 W heaters" in heater["messages"][1]["content"]
    old = by_id["c1a0de00-0003"]["messages"][1]["content"]
    assert old == "Here it is:\n\nStart by testing the new water's salinity."
    c = res.changes
    assert c["tool calls dropped"] == 1 and c["tool results dropped"] == 2 and c["attachments dropped"] == 1
    assert c["artifacts kept as the assistant's text"] == 1
    assert c["files referenced (their content is not in the export)"] == 1 and c["messages on branches not taken"] == 1
    assert res.skipped_count == 1
    fold = {r["id"]: r for r in import_file(EXP / "claude_conversations.json", options=Options(tools="fold")).records}
    a = fold["c1a0de00-0001"]["messages"]
    assert a[0]["content"].endswith('<attachment name="lights.txt">\n06:00 on\n18:00 off\n</attachment>')
    assert a[1]["content"].startswith("<think>\nTwelve hours") and '<tool_call name="web_search">' in a[1]["content"]
    assert_clean(texts(res))


def test_detection_reads_the_content_not_the_name(tmp_path):
    cases = {"notes.md": EXP / "chatgpt_conversations.json", "data.json": EXP / "decorated.md",
             "export.txt": EXP / "claude_conversations.json", "x.jsonl": EXP / "obsidian_nexus.md"}
    want = {"notes.md": "chatgpt", "data.json": "markdown", "export.txt": "claude", "x.jsonl": "markdown"}
    for name, src in cases.items():
        shutil.copy(src, tmp_path / name)
        assert import_file(tmp_path / name).format == want[name], name


def test_zip_archive_of_an_export(tmp_path):
    z = tmp_path / "chatgpt-export-2025.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(EXP / "chatgpt_conversations.json", "export/conversations.json")
        zf.writestr("export/chat.html", "<html></html>")
    res = import_file(z)
    assert res.format == "chatgpt" and len(res.records) == 4 and "zip member export/conversations.json" in res.how
    bad = tmp_path / "photos.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("a.jpg", b"x")
    with pytest.raises(ImportFormatError, match="without conversations.json"):
        import_file(bad)


def test_companion_files_of_an_export_get_a_hint(tmp_path):
    f = tmp_path / "users.json"
    f.write_text(json.dumps([{"uuid": "u", "full_name": "R", "email_address": "r@example.org"}]))
    with pytest.raises(ImportFormatError, match="Claude's users.json"):
        import_file(f)


def test_every_importers_output_passes_data_check(tmp_path, capsys):
    srcs = sorted(EXP.glob("*.md")) + sorted(EXP.glob("*.json")) + sorted(EXP.glob("*.jsonl")) + [
        OLD / "transcript.md", OLD / "chatgpt_conversations.json", OLD / "alpaca.json"]
    for src in srcs:
        for tools in ("drop", "fold", "keep"):
            out = tmp_path / f"{src.name}.{tools}.jsonl"
            assert main(["data", "import", str(src), "-o", str(out), "--tools", tools, "--json"]) == 0, src
            doc = json.loads(capsys.readouterr().out)
            assert doc["records"] == len(out.read_text().splitlines()) > 0
            assert main(["data", "check", str(out)]) == 0, (src, tools)
            capsys.readouterr()


def test_cli_reports_every_change_by_reason(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["data", "import", str(EXP / "chatgpt_conversations.json"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "format chatgpt (detected: ChatGPT export" in err and "5 read -> 4 records" in err
    assert re.search(r"\s2\s+messages on branches not taken", err) and "skipped" in err
    assert main(["data", "import", str(EXP / "chatgpt_conversations.json"), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["changes"]["messages on branches not taken"] == 2 and doc["skipped_count"] == 1
    assert doc["format"] == "chatgpt" and doc["detected"] is True


def test_bom_and_crlf_jsonl_is_valid_everywhere(tmp_path, capsys):
    src = EXP / "bom_crlf.jsonl"
    assert src.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in src.read_bytes()
    assert main(["data", "check", str(src)]) == 0
    assert main(["data", "import", str(src), "-o", str(tmp_path / "o.jsonl")]) == 0
    assert [r.data["id"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["bom-1", "bom-2"]
    ws = tmp_path / "ws"
    assert main(["data", "curate", str(src), "--name", "bom", "-w", str(ws), "--test-frac", "0.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["manifest"]["counts"]["quarantine"] == 0


def test_a_refused_import_leaves_the_output_as_it_was(tmp_path):
    data = json.loads((EXP / "chatgpt_conversations.json").read_text())
    bad = tmp_path / "conversations.json"
    bad.write_text(json.dumps(data[:2])[:-1] + ', {"mapping": {"a": }]')  # valid items, then broken JSON
    out = tmp_path / "out.jsonl"
    out.write_text("before\n")
    with pytest.raises(ImportFormatError, match="invalid JSON after item 2"):
        import_to(bad, out)
    assert out.read_text() == "before\n" and sorted(p.name for p in tmp_path.iterdir()) == ["conversations.json", "out.jsonl"]


def test_progress_is_reported_while_streaming(tmp_path):
    seen = []
    import_to(EXP / "chatgpt_conversations.json", tmp_path / "o.jsonl", on_progress=lambda d, t: seen.append((d, t)))
    total = (EXP / "chatgpt_conversations.json").stat().st_size
    assert seen and all(t == total for _, t in seen) and seen[-1][0] == total
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_markdown_variants_users_keep(tmp_path):
    """Bold labels with a time stamp, a custom GPT known only by its emoji, a nexus attachment."""
    f = tmp_path / "bold.md"
    f.write_text("# Export\n\n**RAF** (23/07/2025 10:32):\nhello there\n\n**ChatGPT** (23/07/2025 10:33):\n"
                 "Hi! **Note:** bold inside a turn.\n\n**RAF** (23/07/2025 10:34): and again\n\n**ChatGPT**: ok\n")
    rec = import_file(f).records[0]
    assert [m["content"] for m in rec["messages"]] == ["hello there", "Hi! **Note:** bold inside a turn.",
                                                       "and again", "ok"]
    f = tmp_path / "nova.md"
    f.write_text("## 👤 **RAF**\nhi Nova\n\n## 🤖 **Nova**\nHello. In short:\n\n## ✨ Summary\nAll good.\n\n"
                 "## 👤 **RAF**\nthanks\n\n## 🤖 **Nova**\nwelcome\n")
    res = import_file(f)
    assert roles(res.records[0]) == ["user", "assistant", "user", "assistant"]
    assert "## ✨ Summary\nAll good." in res.records[0]["messages"][1]["content"]
    assert res.labels["h2 Nova"] == "assistant (learned from its emoji)"
    f = tmp_path / "nexus.md"
    f.write_text(">[!nexus_user] **User** - 18.06.2025 at 21:26\n> read this\n<!-- UID: 1 -->\n\n"
                 ">[!nexus_attachment] **notes.pdf**\n> pdf text\n\n>[!nexus_agent] **Assistant** - 18.06.2025 at 21:27\n"
                 "> done\n")
    drop = import_file(f)
    assert [m["content"] for m in drop.records[0]["messages"]] == ["read this", "done"]
    assert drop.changes["attachments dropped"] == 1
    fold = import_file(f, options=Options(tools="fold"))
    assert fold.records[0]["messages"][0]["content"] == 'read this\n\n<attachment name="notes.pdf">\npdf text\n</attachment>'


def test_citation_leftovers_and_mac_roman_emoji_are_cleaned(tmp_path):
    conv = json.loads((EXP / "chatgpt_conversations.json").read_text())[2]
    node = next(n for n in conv["mapping"].values() if n["message"] and n["message"]["author"]["role"] == "assistant"
                and n["message"]["content"]["content_type"] == "text")
    node["message"]["content"]["parts"] = ["Facts citeturn0search3turn0news1. See entity[\"people\",\"Ada Lovelace\","
                                           "\"mathematician\"] and filecite turn0file0 here \uf8ffüë§."]
    f = tmp_path / "conversations.json"
    f.write_text(json.dumps([conv]))
    res = import_file(f)
    text = res.records[0]["messages"][1]["content"]
    assert text.startswith("Facts. See Ada Lovelace and here 👤.")
    assert res.changes["citation markers removed"] == 2 and res.changes["turns repaired (mojibake)"] == 1


def test_claude_user_turn_that_is_only_pasted_text_keeps_it(tmp_path):
    conv = {"uuid": "c-paste", "name": "Paste", "chat_messages": [
        {"uuid": "p1", "sender": "human", "text": "", "content": [],
         "attachments": [{"file_name": "", "extracted_content": "Summarise: the tank log shows 25 C all week."}],
         "files": []},
        {"uuid": "p2", "sender": "assistant", "text": "Stable at 25 C.", "content": [], "attachments": [], "files": []}]}
    f = tmp_path / "conversations.json"
    f.write_text(json.dumps([conv]))
    res = import_file(f)
    assert [m["content"] for m in res.records[0]["messages"]] == ["Summarise: the tank log shows 25 C all week.",
                                                                  "Stable at 25 C."]
    assert res.changes["attachments kept as the turn's text (it had no other)"] == 1


def test_a_folder_of_exports_imports_into_one_file(tmp_path, capsys):
    vault = tmp_path / "vault"
    (vault / "chats").mkdir(parents=True)
    (vault / ".obsidian").mkdir()
    shutil.copy(EXP / "decorated.md", vault / "chats" / "a.md")
    shutil.copy(EXP / "obsidian_nexus.md", vault / "b.md")
    (vault / ".obsidian" / "app.json").write_text("{}")
    (vault / "groceries.md").write_text("# Groceries\n- eggs\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "import", str(vault), "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["records"] == 2 and doc["format"] == "markdown" and len(doc["files"]) == 3
    assert doc["skipped"][0]["where"].endswith("groceries.md") and "no speaker labels" in doc["skipped"][0]["reason"]
    assert main(["data", "check", str(out)]) == 0
    # the same non-chat file given alone is refused, and nothing is written
    assert main(["data", "import", str(vault / "groceries.md"), "-o", str(tmp_path / "g.jsonl")]) == 1
    assert not (tmp_path / "g.jsonl").exists()
