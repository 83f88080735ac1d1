"""Issue 38's acceptance in a real headless browser (Debian's chromium): a finished tiny run on the
embedded cluster, its Try page sends a prompt to the run and its base, both answers stream in, the
person marks the better one (twice, on two prompts), and a new version of the preference dataset
appears (`duet data versions`), committed in git. Then the held-out prompts and their scores."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.browser import chrome, js_errors, wait_for
from tests.e2e.test_dashboard import duet  # the CLI in a process of its own, asserting it exits 0

pytestmark = pytest.mark.e2e


def test_try_page_compares_streams_and_keeps_judgements_as_a_dataset(tmp_path, repo_root):
    shots = Path(os.environ.get("DUET_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    ws = tmp_path / "ws"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"preset: demo\nmodel: tiny\ndata: [{repo_root / 'examples/persona/persona.jsonl'}]\n"
                   "dataset: persona\noverrides: {max_steps: 6, checkpoint_every: 3, eval_every: 6, sample_prompts: 1}\n")
    dash = json.loads(duet("up", "--dashboard", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)["dashboard"]
    driver = None
    try:
        run = json.loads(duet("run", str(cfg), "--workspace", str(ws), "--json", cwd=tmp_path, timeout=600).stdout)
        run_id = run["run_id"]
        assert json.loads((ws / "runs" / run_id / "run.json").read_text())["status"] == "finished", run
        driver = chrome()
        driver.get(dash["login_url"])
        base = dash["url"].rstrip("/")
        driver.get(f"{base}/runs/{run_id}")
        wait_for(lambda: driver.find_element("id", "try-link"), what="the Try link").click()
        wait_for(lambda: driver.find_element("id", "prompt"), what="the Try page")
        driver.find_element("id", "temperature").clear()
        driver.find_element("id", "temperature").send_keys("1")
        for n, (prompt, better) in enumerate((("Who are you?", "better-0"), ("What do you like to do?", "better-1"))):
            box = driver.find_element("id", "prompt")
            box.clear()
            box.send_keys(prompt)
            driver.find_element("id", "send").click()
            answers = wait_for(lambda: driver.execute_script(
                "const t = window.duetTry; return t && t.answers.length === 2 && t.done === 2 && t.answers"),
                timeout=300, what="two answers streamed")
            assert [a["model"] for a in answers] == [run_id, "base"] and all(a["state"] == "done" for a in answers)
            shown = [e.text for e in driver.find_elements("css selector", "#answers .answer pre")]
            assert len(shown) == 2 and all(a["text"].strip() for a in answers)
            assert "tokens/s" in driver.find_element("css selector", "#answers .answer .meta").text
            if n == 0:
                driver.save_screenshot(str(shots / "try.png"))
            driver.find_element("id", better).click()
            kept = wait_for(lambda: driver.execute_script("return window.duetTry.kept"), what="the judgement kept")
            assert kept["pairs"]["added"] == 1 and kept["pairs"]["records"] == n + 1
        assert kept["pairs"]["version"]["counts"]["train"] + kept["pairs"]["version"]["counts"]["test"] == 2
        assert "version" in driver.find_element("id", "kept").text
        versions = json.loads(duet("data", "versions", "--workspace", str(ws), "--json", cwd=tmp_path).stdout)
        mine = [v for v in versions["versions"] if v["name"] == "judgements"]
        assert [v["content_hash"] for v in mine] == [kept["pairs"]["version"]["content_hash"]]
        log = subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True, text=True).stdout
        assert "judgements: judgements +1 (2 in all)" in log and "dataset: judgements" in log
        pair = json.loads((ws / "judgements" / "judgements.jsonl").read_text().splitlines()[1])
        assert pair["chosen"][0]["content"] == answers[1]["text"] and pair["metadata"]["chosen"]["model"] == "base"

        # the held-out prompts one click away, and each model's loss on their references
        driver.find_element("id", "load-held-out").click()
        wait_for(lambda: driver.find_elements("css selector", ".held-out-prompt"), what="held-out prompts")[0].click()
        assert "reference:" in driver.find_element("id", "try-status").text
        driver.find_element("id", "score").click()
        rows = wait_for(lambda: driver.find_elements("css selector", "#scores tbody tr"), timeout=300, what="scores")
        assert len(rows) >= 2 and "mean" in rows[-1].text
        assert not js_errors(driver), js_errors(driver)
    finally:
        if driver is not None:
            driver.quit()
        duet("down", "--workspace", str(ws), "--json", cwd=tmp_path)
