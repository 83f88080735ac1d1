"""Hyper-parameter sweeps: ``--grid KEY=V1,V2`` flags -> one typed training config per grid point, and
once the runs have finished, a comparison (table, JSON, an SVG chart) with the best run named.

Keys are TrainConfig fields, or ``lora.<field>``. Values are numbers as people type them (``2e-4``), else YAML
scalars (``true`` is a bool). Every point is validated by the same TrainConfig as a preset, before any
run starts; an error names the flag and the allowed keys. A sweep writes
``sweeps/<id>/comparison.{json,md,svg}`` into the workspace.
Runs are placed by the caller (cluster/cli/sweep.py); with one executor they run one after the other.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import yaml

from training.config import LoraSettings, PlanError, TrainConfig, load_config

MAX_POINTS = 64
COLUMNS = (("eval_loss_after", "eval loss"), ("perplexity_after", "perplexity"), ("tokens_per_s", "tokens/s"),
           ("train_peak_bytes", "peak memory"), ("wall_s", "wall s"))


class SweepError(ValueError):
    pass


def _value(raw: str):
    """A number as a person types it (``1e-4`` too, which YAML 1.1 reads as text), else a YAML scalar."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return yaml.safe_load(raw)


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``["learning_rate=1e-4,2e-4", "lora.r=8,16"]`` -> {"learning_rate": [0.0001, 0.0002], "lora.r": [8, 16]}."""
    allowed = sorted(set(TrainConfig.model_fields) - {"lora", "name", "watchdog"}) + \
        [f"lora.{k}" for k in LoraSettings.model_fields]
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise SweepError(f"--grid {spec!r}: use KEY=V1,V2 (e.g. learning_rate=1e-4,2e-4)")
        if key not in allowed:
            raise SweepError(f"--grid {spec!r}: {key!r} is not a training field; allowed: {', '.join(allowed)}")
        if key in grid:
            raise SweepError(f"--grid {spec!r}: {key} is given twice")
        vals = []
        for raw in values.split(","):
            try:
                v = _value(raw.strip())
            except yaml.YAMLError as exc:
                raise SweepError(f"--grid {spec!r}: {raw!r} is not a value ({exc})") from exc
            if isinstance(v, float) and not math.isfinite(v):
                raise SweepError(f"--grid {spec!r}: {raw!r} is not a finite number")
            if v in vals:
                raise SweepError(f"--grid {spec!r}: {raw!r} is repeated")
            vals.append(v)
        grid[key] = vals
    if not grid:
        raise SweepError("a sweep needs at least one --grid KEY=V1,V2")
    n = math.prod(len(v) for v in grid.values())
    if n > MAX_POINTS:
        raise SweepError(f"the grid has {n} points; at most {MAX_POINTS} (split the sweep)")
    return grid


def expand(grid: dict[str, list], preset: str, base: dict | None = None) -> list[dict]:
    """One overrides mapping per grid point (in grid order), each checked by TrainConfig."""
    base = dict(base or {})
    base_cfg = load_config(preset, base)
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        o = dict(base)
        lora = base_cfg.lora.model_dump()
        for k, v in zip(keys, values):
            if k.startswith("lora."):
                lora[k[5:]] = v
            else:
                o[k] = v
        if any(k.startswith("lora.") for k in keys):
            o["lora"] = lora
        try:
            cfg = load_config(preset, o, "--grid")
        except PlanError as exc:
            point = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
            raise SweepError(f"grid point {point}: {exc}") from exc
        points.append({"point": dict(zip(keys, values)), "overrides": o, "train": cfg})
    return points


def compare(sweep_id: str, runs: list[dict]) -> dict:
    """``runs``: [{"point", "run_id", "record"}]. Rows of the figures that matter, and the best finished
    run by eval loss (perplexity for SFT follows it)."""
    rows = []
    for r in runs:
        rec = r.get("record") or {}
        row = {"run_id": r.get("run_id"), "point": r["point"], "status": rec.get("status", r.get("status", "?"))}
        for key, _ in COLUMNS:
            row[key] = rec.get(key)
        if row["wall_s"] is None:
            row["wall_s"] = rec.get("train_s")
        rows.append(row)
    done = [x for x in rows if x["status"] == "finished" and x["eval_loss_after"] is not None]
    best = min(done, key=lambda x: x["eval_loss_after"]) if done else None
    return {"sweep_id": sweep_id, "rows": rows, "best": best and {"run_id": best["run_id"], "point": best["point"],
                                                                    "eval_loss_after": best["eval_loss_after"]}}


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if key == "train_peak_bytes":
        return f"{v / 2**20:.0f} MiB"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(c: dict) -> str:
    keys = list(c["rows"][0]["point"]) if c["rows"] else []
    head = ["run", *keys, "status", *(label for _, label in COLUMNS)]
    lines = [f"# sweep {c['sweep_id']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c["rows"]:
        best = c["best"] and r["run_id"] == c["best"]["run_id"]
        lines.append("| " + " | ".join([f"**{r['run_id']}**" if best else str(r["run_id"]),
                                        *(str(r["point"][k]) for k in keys), r["status"],
                                        *(_cell(k, r[k]) for k, _ in COLUMNS)]) + " |")
    lines += ["", f"best: {c['best']['run_id']} ({c['best']['point']}), eval loss {c['best']['eval_loss_after']:.4f}"
              if c["best"] else "best: none (no run finished)", "", "![eval loss](eval_loss.svg)", ""]
    return "\n".join(lines)


def svg(c: dict) -> str:
    """A bar chart of eval loss a run, with no plotting library (the design host has none)."""
    rows = [r for r in c["rows"] if r["eval_loss_after"] is not None]
    w, bar, gap, top = 640, 28, 10, 30
    h = top + len(rows) * (bar + gap) + 10
    hi = max([r["eval_loss_after"] for r in rows] or [1.0]) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="8" y="18">eval loss, sweep {c["sweep_id"]}</text>']
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        length = int((w - 260) * r["eval_loss_after"] / hi)
        best = c["best"] and r["run_id"] == c["best"]["run_id"]
        label = ", ".join(f"{k}={v}" for k, v in r["point"].items())
        out += [f'<text x="8" y="{y + 18}">{label}</text>',
                f'<rect x="200" y="{y}" width="{length}" height="{bar}" fill="{"#2a7" if best else "#58a"}"/>',
                f'<text x="{206 + length}" y="{y + 18}">{r["eval_loss_after"]:.4f}</text>']
    return "\n".join(out + ["</svg>", ""])


def write(root: Path, c: dict) -> dict[str, Path]:
    """sweeps/<id>/comparison.json, comparison.md and eval_loss.svg under the workspace ``root``."""
    d = root / "sweeps" / c["sweep_id"]
    d.mkdir(parents=True, exist_ok=True)
    files = {"json": d / "comparison.json", "md": d / "comparison.md", "svg": d / "eval_loss.svg"}
    files["json"].write_text(json.dumps(c, indent=2, default=str) + "\n")
    files["md"].write_text(markdown(c))
    files["svg"].write_text(svg(c))
    return files
