"""Sweep grids: parsed and validated by the training config's own rules before any run; the
comparison names the best finished run."""

import pytest

from roles import sweep


def test_a_grid_expands_into_typed_points_with_nested_lora():
    grid = sweep.parse_grid(["learning_rate=1e-4,2e-4", "lora.r=8,16"])
    assert grid == {"learning_rate": [1e-4, 2e-4], "lora.r": [8, 16]}
    points = sweep.expand(grid, "demo", {"max_steps": 20})
    assert len(points) == 4
    assert [p["point"] for p in points][:2] == [{"learning_rate": 1e-4, "lora.r": 8}, {"learning_rate": 1e-4, "lora.r": 16}]
    o = points[1]["overrides"]
    assert o["max_steps"] == 20 and o["learning_rate"] == 1e-4 and o["lora"]["r"] == 16
    assert o["lora"]["alpha"] > 0  # the preset's other LoRA settings are kept


@pytest.mark.parametrize("spec,words", [
    (["lr=1e-4"], "not a training field; allowed:"),
    (["learning_rate"], "use KEY=V1,V2"),
    (["learning_rate=1e-4,1e-4"], "repeated"),
    (["learning_rate=1e-4", "learning_rate=2e-4"], "given twice"),
    (["learning_rate=.nan"], "finite"),
    (["micro_batch=1,2,3,4,5,6,7,8", "seed=1,2,3,4,5,6,7,8,9"], "at most 64"),
])
def test_a_bad_grid_is_refused_with_what_is_allowed(spec, words):
    with pytest.raises(sweep.SweepError, match=words):
        sweep.parse_grid(spec)


def test_a_point_the_training_config_refuses_is_named():
    with pytest.raises(sweep.SweepError, match=r"grid point learning_rate=2.*learning_rate"):
        sweep.expand(sweep.parse_grid(["learning_rate=1e-4,2"]), "demo")
    with pytest.raises(sweep.SweepError, match="micro_batch=four"):
        sweep.expand(sweep.parse_grid(["micro_batch=2,four"]), "demo")


def test_the_comparison_names_the_best_finished_run(tmp_path):
    runs = [{"point": {"learning_rate": 1e-4}, "run_id": "a",
             "record": {"status": "finished", "eval_loss_after": 1.5, "perplexity_after": 4.48, "tokens_per_s": 90.0,
                        "train_peak_bytes": 3 << 30, "wall_s": 40.0}},
            {"point": {"learning_rate": 2e-4}, "run_id": "b",
             "record": {"status": "finished", "eval_loss_after": 1.2, "tokens_per_s": 88.0, "wall_s": 41.0}},
            {"point": {"learning_rate": 9e-1}, "run_id": None, "status": "failed"}]
    c = sweep.compare("s1", runs)
    assert c["best"] == {"run_id": "b", "point": {"learning_rate": 2e-4}, "eval_loss_after": 1.2}
    assert [r["status"] for r in c["rows"]] == ["finished", "finished", "failed"]
    files = sweep.write(tmp_path, c)
    md = files["md"].read_text()
    assert "| **b** | 0.0002 | finished | 1.2 |" in md and "3072 MiB" in md and "best: b" in md
    assert files["svg"].read_text().startswith("<svg") and "1.2000" in files["svg"].read_text()
