"""The README's two commands stay true: `make demo` and `make test` exist and `make demo` runs."""

import json
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.e2e


def test_readme_names_the_two_newcomer_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S).group(1)
    cmds = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert cmds == ["make demo", "make test"]


def test_make_demo_runs_the_demo_path(repo_root, tmp_path):
    """The real `make demo` target (setup is a no-op once done), with --tiny for speed."""
    ws = tmp_path / "ws"
    r = subprocess.run(["make", "-s", "demo", f"DEMO_ARGS=--tiny --max-steps 6 --workspace {ws} --json"],
                       cwd=repo_root, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DUET_TORCH_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["ok"] and (ws / "runs" / summary["run_id"] / "run.json").is_file()
    # the demo's persona.gguf was checked by llama.cpp itself (make setup installs it)
    v = summary["exported"]["verification"]
    assert v["judge"].startswith("llama.cpp") and v["top1_agreement"] >= 0.95, v
