"""The README's measured figures are the committed benchmark JSON's (issue 37): a figure carries its
source as ``<!--fig FILE KEY.PATH-->`` right after it, and must equal that value at the precision shown."""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIG = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*(?:[A-Za-z/%]{0,10})<!--fig (\S+) (\S+)-->")


def figures(text: str) -> list[tuple[str, str, str]]:
    return FIG.findall(text)


def value(path: Path, key: str):
    node = json.loads(path.read_text())
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_every_annotated_readme_figure_equals_its_json():
    text = (REPO / "README.md").read_text()
    found = figures(text)
    assert len(found) >= 6 and text.count("<!--fig ") == len(found)  # every annotation is read
    wrong = []
    for shown, file, key in found:
        got = value(REPO / file, key)
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        if round(float(got), decimals) != float(shown.replace(",", "")):
            wrong.append(f"README shows {shown} for {file} {key}; the JSON has {got}")
    assert not wrong, wrong


def test_a_figure_that_drifted_from_its_json_is_caught(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"a": {"b": 6.26}}))
    (shown, file, key), = figures(f"took 6.4 s<!--fig {f} a.b--> to fail over")
    assert round(value(Path(file), key), 1) != float(shown)
