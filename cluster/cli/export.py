"""duet export RUN: a finished run -> a verified GGUF (or safetensors folder) + an Ollama Modelfile.

On the executor: through its actor when a cluster runs for this workspace (`duet up`, or a two-host
cluster), else in this process on the runs under --data-dir. The files stay on the GPU host
(default: the run's export/ folder there); ``--fetch`` copies them here. The export is recorded in
the workspace (run.json, report.md, a commit) and as a cortex fact.
"""

from __future__ import annotations

from pathlib import Path

from cluster.cli.common import local_data_dir, workspace_arg
from cluster.console import console, print_error
from cluster.output import EXIT_INFRA, EXIT_INPUT, EXIT_OK, emit_json
from infra.lazy import lazy
from roles.client import call

ray = lazy("ray", extra="architect")
FETCH_CHUNK = 8 << 20
FETCH_WARN_BYTES = 1 << 30


def setup_export(p):
    p.add_argument("run_id")
    p.add_argument("--to", default="gguf", choices=("gguf", "safetensors"))
    p.add_argument("--quant", default="f16", choices=("f16", "bf16", "q8_0"), help="GGUF tensor type (default f16)")
    p.add_argument("--name", help="the model's name: <name>.gguf and `ollama create <name>` (default: the run's name)")
    p.add_argument("-o", "--out", help="output folder on the executor host (default: the run's export/ folder)")
    p.add_argument("--fetch", nargs="?", const="", metavar="DIR",
                   help="copy the exported files to this host (default folder: ./exports/<name>)")
    p.add_argument("--data-dir", help="where runs live when no cluster runs (default: <workspace>/.duet/executor)")
    p.add_argument("--address", help="a cluster's head HOST:PORT (default: the one duet knows for this workspace)")
    p.add_argument("--json", action="store_true")
    workspace_arg(p)


def _fetch(ex, run_id: str, entry: dict, dest: Path, con) -> list[str]:
    files = [f for f in entry["files"].values() if "bytes" in f]
    total = sum(f["bytes"] for f in files)
    if total > FETCH_WARN_BYTES:
        con.print(f"[yellow]fetching {total / 2**30:.2f} GiB over the cluster connection[/]")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = dest / Path(f["path"]).name
        tmp = target.with_name(target.name + ".partial")
        with open(tmp, "wb") as fh:
            for off in range(0, f["bytes"], FETCH_CHUNK):
                fh.write(call(ex, "read_export", run_id, f["path"], off, FETCH_CHUNK, timeout=600))
        tmp.replace(target)
        out.append(str(target))
    return out


def run_export(a) -> int:
    from cluster import embedded, two_host
    from roles.architect import record_export
    from training.run.executor import ExecutorError, export, record_files, run_dir
    from training.export.gguf_write import ExportError

    con = console()
    opts = {"to": a.to, "quant": a.quant, "name": a.name, "out_dir": a.out}
    address = two_host.cluster_address(a.workspace, a.address)
    try:
        if address:
            ex = two_host.executor_handle(a.workspace, address, run_id=a.run_id)
            with con.status(f"exporting {a.run_id} on the executor (write, then verify)..."):
                entry = call(ex, "export", a.run_id, opts, timeout=7200)
            files = call(ex, "fetch_record", a.run_id, timeout=120)
        else:
            if a.fetch is not None:
                print_error("--fetch copies from a cluster's executor; no cluster runs for this workspace")
                return EXIT_INPUT
            data_dir = local_data_dir(a)
            with con.status(f"exporting {a.run_id} (write, then verify)..."):
                entry = export(data_dir, a.run_id, **opts)
            files = record_files(run_dir(data_dir, a.run_id))
    except (ExportError, ExecutorError) as exc:
        print_error(exc)
        return EXIT_INPUT
    except ray.exceptions.RayTaskError as exc:
        print_error(getattr(exc, "cause", None) or exc)
        return EXIT_INPUT
    except ConnectionError as exc:
        print_error(exc)
        return EXIT_INFRA
    pg, mongo = embedded.store_urls(a.workspace)
    doc = {**entry, "recorded": record_export(a.workspace, pg, mongo, files, entry)}
    if a.fetch is not None:
        doc["fetched"] = _fetch(ex, a.run_id, entry, Path(a.fetch or Path("exports") / entry["name"]), con)
    if a.json:
        emit_json(doc)
        return EXIT_OK
    v = entry["verification"]
    con.print(f"[green]exported[/] {entry['dir']}")
    for f in entry["files"].values():
        if "bytes" in f:
            con.print(f"  {f['path']}  {f['bytes'] / 2**20:.1f} MiB  sha256 {f['sha256'][:16]}")
    if "top1_agreement" in v:
        extra = f", mean KL {v['kl_mean']:.1e}" if "kl_mean" in v else ""
        if v.get("greedy"):
            extra += (f", greedy {sum(g['equal_prefix'] for g in v['greedy'])}/{sum(g['tokens'] for g in v['greedy'])} "
                      "tokens equal")
        con.print(f"checked by {v['judge']} on {v['prompts']} held-out prompts: top-1 agreement "
                  f"{v['top1_agreement']:.3f}{extra}, tokenizer ids equal")
    if v.get("lora"):
        con.print(f"the LoRA file on the base model's GGUF: top-1 agreement {v['lora']['top1_agreement']:.3f}")
    if v.get("llama_cpp", "").startswith("not run"):
        con.print(f"[yellow]llama.cpp {v['llama_cpp']}[/]")
    if entry["modelfile"]["template_family"] is None:
        con.print(f"[yellow]Modelfile without TEMPLATE[/]: {entry['modelfile']['template_basis']}; Ollama uses the "
                  "GGUF's own chat template")
    con.print(f"run it: {entry['commands']['ollama']}")
    return EXIT_OK
