"""The one rule for reading files out of a workspace or a run (infra/safe_files.py), the safetensors
header check, and where an export may write."""

import json
import os
import struct

import pytest

from infra import safe_files
from infra.safe_files import FileRefused


def test_a_file_is_read_only_inside_its_root_and_within_its_limit(tmp_path):
    root = tmp_path / "ws"
    (root / "runs" / "r1").mkdir(parents=True)
    (root / "runs" / "r1" / "run.json").write_text('{"run_id": "r1"}')
    token = tmp_path / "ray_token"
    token.write_text("TOKEN")
    (root / "runs" / "r1" / "report.md").symlink_to(token)
    (root / "runs" / "r2").symlink_to(tmp_path)  # a folder on the way that leads out
    (root / "inner.json").symlink_to(root / "runs" / "r1" / "run.json")  # inside: fine
    os.mkfifo(root / "fifo")
    assert safe_files.read_json(root, "runs/r1/run.json") == {"run_id": "r1"}
    assert safe_files.read_json(root, "inner.json") == {"run_id": "r1"}
    for path, says in (("runs/r1/report.md", "outside"), ("runs/r2/ray_token", "outside"), ("../ray_token", "outside"),
                       ("fifo", "not a regular file"), ("runs", "not a regular file")):
        with pytest.raises(FileRefused, match=says):
            safe_files.read_bytes(root, path)
    with pytest.raises(FileNotFoundError):
        safe_files.read_bytes(root, "nope.json")
    with pytest.raises(FileRefused, match="limit"):
        safe_files.read_bytes(root, "runs/r1/run.json", limit=4)
    (root / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FileRefused, match="too deep"):
        safe_files.read_json(root, "deep.json")


def _safetensors(path, header: dict, data: bytes, claim: int | None = None):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", claim if claim is not None else len(h)) + h + data)
    return path


@pytest.mark.parametrize("header,data,claim,says", [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40, "claims"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "tensor 'w'"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "whole numbers"),
    ({"w": [1, 2]}, b"", None, "tensor 'w'"),
])
def test_a_damaged_safetensors_header_is_named_with_the_file_and_tensor(tmp_path, header, data, claim, says):
    from training.export.gguf_write import ExportError, Safetensors

    f = _safetensors(tmp_path / "model.safetensors", header, data, claim)
    with pytest.raises(ExportError, match=says) as e:
        Safetensors(f)
    assert "model.safetensors" in str(e.value)
    ok = _safetensors(tmp_path / "ok.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                      struct.pack("<2f", 1.0, 2.0))
    assert Safetensors(ok).get("w").tolist() == [1.0, 2.0]


def test_an_export_writes_outside_the_runs_own_folders(tmp_path):
    from training.export.exporter import check_out_dir
    from training.export.gguf_write import ExportError

    run = tmp_path / "runs" / "r1"
    (run / "merged").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    assert check_out_dir(run, run / "export") == run / "export"
    assert check_out_dir(run, tmp_path / "out") == tmp_path / "out"
    for bad, says in ((run / "merged", "merged"), (run / "merged" / "x", "merged"), (run, "the run's own folder"),
                      (run / "checkpoints", "checkpoints"), (tmp_path / "afile", "a file, not a folder"),
                      (tmp_path / "afile" / "sub", "is a file")):
        with pytest.raises(ExportError, match=says):
            check_out_dir(run, bad)
