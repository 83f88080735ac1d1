"""A run's human-readable outputs: ``loss.png`` (matplotlib, Agg) and ``report.md``."""

from __future__ import annotations

from pathlib import Path


MAX_PLOT_POINTS = 2000


def _thin(points: list[dict], key: str) -> tuple[list, list]:
    """At most MAX_PLOT_POINTS (step, value) pairs: every k-th point (the last one kept), so the
    plot costs the same at step 20,000 as at step 2,000."""
    k = max(1, -(-len(points) // MAX_PLOT_POINTS))
    picked = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return [x["step"] for x in picked], [x[key] for x in picked]


def write_loss_plot(path: Path, losses: list[dict], eval_losses: list[dict], title: str) -> None:
    """loss.png, drawn with matplotlib's object API (pyplot's global figure registry grew the
    executor's memory at every redraw of a long run)."""
    if not losses:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(*_thin(losses, "loss"), label="train loss", lw=1.5)
    if eval_losses:
        ax.plot(*_thin(eval_losses, "eval_loss"), "o-", label="eval loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    fig.clear()
    tmp.replace(path)


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def write_report(path: Path, rec: dict) -> None:
    cfg = rec["config"]["train"]
    mem = rec.get("peak_memory", {})
    lines = [
        f"# Run {rec['run_id']}",
        "",
        f"- status: **{rec['status']}**",
        f"- dataset: `{rec['dataset']['name']}` @ `{rec['dataset']['content_hash'][:12]}` "
        f"({rec['dataset']['counts'].get('train')} train / {rec['dataset']['counts'].get('test')} test)",
        f"- model: `{rec['model']['ref']}`, {rec['config']['model']['params'] / 1e6:.1f} M parameters, "
        f"{cfg['method']} r={cfg['lora']['r']} alpha={cfg['lora']['alpha']}, "
        f"{rec['config']['trainable_params'] / 1e6:.2f} M trainable",
        f"- host: {rec['host'].get('hostname')} ({rec['host'].get('device')}), code `{rec['code_sha'][:12]}`",
        f"- steps: {rec.get('steps')} x effective batch {cfg['micro_batch'] * cfg['grad_accum']}, "
        f"lr {cfg['learning_rate']} {cfg['lr_scheduler']}",
        "",
        "## Results",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| eval loss | {_fmt(rec.get('eval_loss_before'))} | {_fmt(rec.get('eval_loss_after'))} |",
        f"| perplexity | {_fmt(rec.get('perplexity_before'), '.2f')} | {_fmt(rec.get('perplexity_after'), '.2f')} |",
        "",
        f"- training time: {_fmt(rec.get('train_s'), '.1f')} s, {_fmt(rec.get('tokens_per_s'), '.0f')} tokens/s "
        f"({rec.get('tokens')} tokens)",
        f"- wall time: {_fmt(rec.get('wall_s'), '.1f')} s",
        f"- peak memory: RSS {mem.get('rss_peak_bytes', 0) / 2**20:.0f} MiB"
        + (f", CUDA reserved {mem['cuda_max_reserved_bytes'] / 2**20:.0f} MiB" if "cuda_max_reserved_bytes" in mem else ""),
        f"- planned estimate: {rec['config']['estimate']['total_bytes'] / 2**20:.0f} MiB",
        *_phase_lines(rec.get("phases") or {}),
        f"- checkpoints: {', '.join(str(c['step']) for c in rec.get('checkpoints', [])) or 'none'}",
        *_merge_lines(rec.get("merged_model") or {}),
        "",
        "![loss](loss.png)",
        "",
        "## Samples (greedy, held-out prompts)",
        "",
    ]
    for s in rec.get("samples", []):
        lines += [f"### {s['id']}", "", f"**prompt:** {s['prompt']}", "", f"**reference:** {s['reference']}", "",
                  f"**generated:** {s['generated']}", ""]
    lines += ["## Export", "", *_export_lines(rec.get("exported") or [])]
    path.write_text("\n".join(lines))


def _export_lines(exports: list[dict]) -> list[str]:
    """Each verified export: its files and how to run it."""
    if not exports:
        return ["Not exported yet: `duet export RUN_ID [--quant f16|bf16|q8_0]` writes a verified GGUF and an Ollama "
                "Modelfile. A GGUF file cannot be trained further; keep the merged 16-bit folder.", ""]
    out = []
    for e in exports:
        v = e.get("verification") or {}
        f = (e.get("files") or {}).get("gguf") or {}
        head = f"- `{f.get('path') or e.get('dir')}`" + (f" ({e.get('quant')}, {f['bytes'] / 2**20:.1f} MiB, sha256 "
                                                         f"`{f['sha256'][:16]}`)" if f.get("bytes") else "")
        judge = v.get("judge") or "transformers' GGUF reload (not llama.cpp)"
        if "top1_agreement" in v:
            head += (f": checked by {judge} on {v['prompts']} held-out prompts, top-1 agreement "
                     f"{v['top1_agreement']:.3f}" + (f", mean KL {v['kl_mean']:.1e}" if "kl_mean" in v else "")
                     + (f", greedy continuations {sum(g['equal_prefix'] for g in v['greedy'])}/"
                        f"{sum(g['tokens'] for g in v['greedy'])} tokens equal" if v.get("greedy") else "")
                     + ", tokenizer ids equal" + (", chat template rendered alike" if v.get("chat_template_equal") else ""))
        elif v.get("judge"):
            head += f": {judge}"
        if (v.get("lora") or {}).get("top1_agreement") is not None:
            head += f"; the LoRA file on the base GGUF: top-1 agreement {v['lora']['top1_agreement']:.3f}"
        if v.get("llama_cpp", "").startswith("not run"):
            head += f" (llama.cpp {v['llama_cpp']})"
        out += [head, f"  - run it: `{e['commands']['ollama']}`"]
        lora = (e.get("files") or {}).get("lora_gguf")
        if lora and lora.get("bytes"):
            out.append(f"  - the adapter alone (llama.cpp `--lora`): `{lora['path']}` ({lora['bytes'] / 2**20:.1f} MiB)")
        if e["commands"].get("llama.cpp"):
            out.append(f"  - or: `{e['commands']['llama.cpp']}`")
    return out + [""]


def _merge_lines(m: dict) -> list[str]:
    """What the merge check measured, and for QLoRA the drift from the nf4 model as trained."""
    if not m:
        return ["- merged model: none"]
    if "verified" in m:
        return [f"- model: `{m.get('path')}` ({m['verified']})"]
    out = [f"- merged model: `{m.get('path')}` ({m.get('dtype')}), verified: {m.get('criterion') or 'max abs diff '}"
           + ("" if m.get("criterion") else _fmt(m.get("logit_max_abs_diff"), ".2e"))]
    d = m.get("qlora_drift")
    if d:
        out.append(f"- QLoRA drift (merged 16-bit model vs the nf4 model + adapter it trained): mean KL "
                   f"{d['kl_mean']:.2e}, max KL {d['kl_max']:.2e}, top-1 agreement {d['top1_agreement']:.3f}, "
                   f"max |logit diff| {d['max_abs']:.2f}")
    return out


def _phase_lines(phases: dict) -> list[str]:
    """Each phase's measured peak beside the planner's estimate of it."""
    rows = [(k, v) for k, v in phases.items() if "estimate_bytes" in v]
    if not rows:
        return []
    cells = ", ".join(f"{k} {v['measured_bytes'] / 2**20:.0f} MiB (planned {v['estimate_bytes'] / 2**20:.0f}, "
                      f"x{v['ratio_estimate_to_measured']:.2f})" for k, v in rows)
    return [f"- memory by phase ({rows[0][1]['measured_as']}): {cells}"]
