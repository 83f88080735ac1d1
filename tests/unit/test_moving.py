"""Moving a run between executors, the files' side (training/run/moving.py): what travels, and that a
damaged transfer puts nothing in place."""

import json

import pytest

from training.run import checkpoints, moving


def make_run(root, run_id="r1"):
    rdir = root / "runs" / run_id
    (rdir / "dataset").mkdir(parents=True)
    (rdir / "spec.json").write_text(json.dumps({"run_id": run_id}))
    (rdir / "run.json").write_text(json.dumps({"run_id": run_id, "status": "cancelled", "moved_to": "gpu-b",
                                               "model_path": "/elsewhere/model"}))
    (rdir / "losses.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (rdir / "dataset" / "train.jsonl").write_text("{}\n")
    (rdir / ".lock").write_text("")
    (rdir / "adapter").mkdir()
    (rdir / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    for step in (10, 20):
        c = rdir / "checkpoints" / f"checkpoint-{step}"
        c.mkdir(parents=True)
        (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (c / "model.safetensors").write_bytes(bytes(range(256)) * step)
        files = {p.name: {"size": p.stat().st_size, "sha256": checkpoints._sha256(p)} for p in c.iterdir()}
        (c / checkpoints.MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return rdir


def copy(src_dir, dst_root, manifest, corrupt=None):
    moving.begin(dst_root / "runs", manifest)
    for f in manifest["files"]:
        data = moving.read_chunk(src_dir, manifest, f["path"], 0, f["bytes"] + 1)
        if f["path"] == corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        moving.write_chunk(dst_root / "runs", manifest, f["path"], 0, data)


def test_the_newest_valid_checkpoint_and_the_logs_move_and_nothing_else(tmp_path):
    src = make_run(tmp_path / "a")
    m = moving.bundle(src)
    paths = {f["path"] for f in m["files"]}
    assert m["checkpoint"] == "checkpoint-20"
    assert {"spec.json", "run.json", "losses.jsonl", "dataset/train.jsonl",
            "checkpoints/checkpoint-20/model.safetensors"} <= paths
    assert not any(p.startswith(("checkpoints/checkpoint-10", "adapter", ".lock")) for p in paths)
    copy(src, tmp_path / "b", m)
    dest = moving.finish(tmp_path / "b" / "runs", m, "127.0.0.2")
    rec = json.loads((dest / "run.json").read_text())
    assert rec["status"] == "queued" and rec["moves"][0]["checkpoint"] == "checkpoint-20"
    assert "moved_to" not in rec and "model_path" not in rec  # the other host's
    assert checkpoints.is_valid(dest / "checkpoints" / "checkpoint-20")
    with pytest.raises(moving.MoveError, match="not a file of"):
        moving.read_chunk(src, m, "../../etc/passwd", 0, 10)


def test_a_damaged_transfer_puts_nothing_in_place(tmp_path):
    src = make_run(tmp_path / "a")
    m = moving.bundle(src)
    copy(src, tmp_path / "b", m, corrupt="checkpoints/checkpoint-20/model.safetensors")
    with pytest.raises(moving.MoveError, match="arrived damaged"):
        moving.finish(tmp_path / "b" / "runs", m, "127.0.0.2")
    assert not (tmp_path / "b" / "runs" / "r1").exists()
    assert not moving.incoming(tmp_path / "b" / "runs", "r1").exists()


def test_a_run_without_a_valid_checkpoint_does_not_move_and_a_live_one_is_not_overwritten(tmp_path):
    src = make_run(tmp_path / "a")
    for c in (src / "checkpoints").iterdir():
        (c / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(moving.MoveError, match="no valid checkpoint"):
        moving.bundle(src)
    other = make_run(tmp_path / "b")
    (other / "run.json").write_text(json.dumps({"run_id": "r1", "status": "training"}))
    with pytest.raises(moving.MoveError, match="already exists"):
        moving.begin(tmp_path / "b" / "runs", {"run_id": "r1", "files": []})
