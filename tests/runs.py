"""Running a planned run on the engine (no Ray) from a test."""

from __future__ import annotations

import json


def run_plan(env: tuple, run_id: str, overrides: dict, model: str = "tiny", timeout: float = 900) -> tuple:
    """Plan the demo preset with ``overrides`` for ``model``, run it on the engine, wait: (final
    state, run.json, the run's folder)."""
    ex = env[1]
    submit_plan(env, run_id, overrides, model)
    state = ex.wait(run_id, timeout=timeout)
    d = ex.data_dir / "runs" / run_id
    return state, json.loads((d / "run.json").read_text()), d


def submit_plan(env: tuple, run_id: str, overrides: dict, model: str = "tiny") -> str:
    """Plan the demo preset with ``overrides`` for ``model`` and submit it to the executor; returns at once."""
    arch, ex, ds = env
    plan = arch.design_plan("demo", ex.probe(), ex.prepare_model(model), model, ds, overrides)
    return ex.submit(arch.submission({**plan, "run_id": run_id}, ds))
