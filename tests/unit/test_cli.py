import json
import re
import subprocess
import sys


from cluster.cli import COMMANDS, main

DUET = [sys.executable, "-m", "cluster.cli"]


def test_command_table_matches_the_documented_cli(repo_root):
    """Every command of the README's CLI contract is in the table, and nothing else."""
    readme = (repo_root / "README.md").read_text()
    block = readme.split("<!-- cli -->")[1]
    documented = set()
    for line in block.splitlines():
        if line.startswith("duet "):
            usage = re.split(r"\s{2,}", line)[0]
            documented |= {alt.strip().removeprefix("duet ").split()[0] for alt in usage.split(" | ")}
    assert documented == set(COMMANDS)


def test_help_is_fast_and_lists_every_command():
    out = subprocess.run(DUET + ["--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", out, re.M), name
    # duet --help must not import the heavy stack
    probe = "import sys, cluster.cli as c; c.build_parser(); print(sorted(m for m in ('torch','ray','transformers','psycopg','pymongo') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_plan_exit_codes_and_json(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                               "intermediate_size": 11008, "num_attention_heads": 32, "vocab_size": 32000}))
    assert main(["plan", "--model", str(cfg), "--gpu-mem", "24GiB", "--method", "full", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["estimate"]["fits"] is False and doc["suggestions"]
    assert main(["plan", "--model", str(cfg), "--gpu-mem", "24GiB", "--method", "qlora", "--seq-len", "512",
                 "--batch", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["estimate"]["fits"] is True
    assert 9 * 2**30 <= doc["estimate"]["total_bytes"] <= 16 * 2**30  # published: 12.3 GB peak (QLoRA r=16)
    assert main(["plan", "--model", str(tmp_path / "nope"), "--gpu-mem", "24GiB"]) == 1


def test_data_check_exit_codes(tmp_path, repo_root, capsys):
    assert main(["data", "check", str(repo_root / "examples/persona/persona.jsonl")]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "messages": []}\n{oops\n')
    assert main(["data", "check", str(bad), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {p["line"] for p in doc["problems"]} == {1, 2}
