"""`duet data import | check | curate`: chat exports in, checked datasets out."""

from __future__ import annotations

import sys

from cluster.output import EXIT_INPUT, EXIT_OK, emit_json as _emit_json, float_arg, int_arg
from cluster.console import print_error


def _console():
    from cluster.console import console

    return console()


def _labels(values: list[str] | None, flag: str) -> tuple[str, ...]:
    """--user-label A --user-label B, or A,B: the labels given (empty when none)."""
    out = []
    for text in values or []:
        labels = [x.strip() for x in text.split(",") if x.strip()]
        if not labels:
            raise ValueError(f"{flag} {text!r}: give a speaker label, e.g. {flag} RAF")
        out += labels
    return tuple(out)


def setup_data(p):
    from cluster.cli.common import workspace_arg as _workspace_arg
    from training.data.importers import FORMATS, MAX_LEN, TOOLS_MODES

    sub = p.add_subparsers(dest="data_cmd", metavar="{import,check,curate,versions,show,diff}")
    imp = sub.add_parser("import", help="convert a chat export (ChatGPT, Claude, Markdown) or a dataset "
                                        "(jsonl/sharegpt/alpaca/dpo) to canonical JSONL")
    imp.add_argument("src", nargs="+", help="the export: conversations.json, the export's .zip, a Markdown file, a "
                                            "JSON(L) file; or several, or a folder of them (an Obsidian vault)")
    imp.add_argument("--format", default="auto", choices=FORMATS,
                     help="auto (default) detects it from the content and says what it found")
    imp.add_argument("-o", "--output", required=True, help="the canonical JSONL to write")
    imp.add_argument("--tools", choices=TOOLS_MODES, default="drop",
                     help="tool calls/results, attachments and images: drop (default; the assistant's words stay), "
                          "fold them into the turns as text, or keep tool results as tool messages")
    imp.add_argument("--max-len", type=int_arg(1), default=MAX_LEN,
                     help=f"split conversations longer than this many tokens at turn boundaries (default {MAX_LEN})")
    imp.add_argument("--no-split", action="store_true", help="never split a conversation")
    imp.add_argument("--tokenizer", help="a model folder whose tokenizer counts the tokens (else an estimate)")
    imp.add_argument("--no-repair", action="store_true", help="leave mojibake as it is")
    imp.add_argument("--user-label", "--user-labels", dest="user_labels", action="append", metavar="LABEL",
                     help="a Markdown speaker label that is the user (overrides what is learned; repeat or comma-separate)")
    imp.add_argument("--assistant-label", "--assistant-labels", dest="assistant_labels", action="append",
                     metavar="LABEL", help="a Markdown speaker label that is the assistant")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.add_argument("--json", action="store_true")
    chk = sub.add_parser("check", help="validate chat/DPO JSONL files, reporting every problem")
    chk.add_argument("files", nargs="+")
    chk.add_argument("--max-len", type=int_arg(1), help="maximum sequence length in tokens")
    chk.add_argument("--tokenizer", help="a model folder whose tokenizer counts the tokens (else an estimate)")
    chk.add_argument("--json", action="store_true")
    cur = sub.add_parser("curate", help="build a dataset version in the workspace and commit it")
    cur.add_argument("files", nargs="+")
    cur.add_argument("--name", required=True)
    cur.add_argument("--test-frac", type=float_arg(0, 1, lo_open=True, hi_open=True), default=0.1)
    cur.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0)
    cur.add_argument("--max-len", type=int_arg(1), help="maximum sequence length in tokens (reports truncation)")
    cur.add_argument("--tokenizer", help="a model folder whose tokenizer counts the tokens (else an estimate)")
    cur.add_argument("--reasoning-target", type=float_arg(0, 1), default=0.5, help="wanted fraction of <think> examples")
    cur.add_argument("--strict", action="store_true", help="refuse the whole input if any record is invalid")
    cur.add_argument("--json", action="store_true")
    _workspace_arg(cur)
    ver = sub.add_parser("versions", help="the workspace's dataset versions with their counts")
    ver.add_argument("--json", action="store_true")
    _workspace_arg(ver)
    show = sub.add_parser("show", help="one version: counts, token lengths, categories, reasoning, quarantine reasons")
    show.add_argument("version", help="NAME (the newest) or NAME@HASH_PREFIX")
    show.add_argument("--json", action="store_true")
    _workspace_arg(show)
    dif = sub.add_parser("diff", help="what changed between two versions (records added, removed, changed, moved)")
    dif.add_argument("a", help="NAME@HASH_PREFIX")
    dif.add_argument("b", help="NAME@HASH_PREFIX (or NAME: the newest)")
    dif.add_argument("--json", action="store_true")
    _workspace_arg(dif)


def _progress(enabled: bool):
    """(on_progress callback, stop) drawing a bar on stderr for a large export; no-ops otherwise."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress("importing", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                   console=_console(), transient=True)
    state = {"task": None}

    def on_progress(done: int, total: int) -> None:
        if state["task"] is None:
            if total < (8 << 20):
                return
            bar.start()
            state["task"] = bar.add_task("import", total=total)
        bar.update(state["task"], completed=done)

    def stop() -> None:
        if state["task"] is not None:
            bar.stop()
    return on_progress, stop


def _run_import(a) -> int:
    from training.data.schema import DatasetError
    from training.data.dataset import tokenizer_counter
    from training.data.importers import ImportFormatError, Options, import_to

    con = _console()
    try:
        counter = tokenizer_counter(a.tokenizer) if a.tokenizer else None
        opts = Options(tools=a.tools, max_len=None if a.no_split else a.max_len, count_tokens=counter,
                       user_labels=_labels(a.user_labels, "--user-label"),
                       assistant_labels=_labels(a.assistant_labels, "--assistant-label"), repair=not a.no_repair)
    except (DatasetError, ValueError) as exc:
        print_error(exc)
        return EXIT_INPUT
    on_progress, stop = _progress(not a.no_progress and not a.json)
    try:
        res = import_to(a.src, a.output, a.format, opts, on_progress=on_progress)
    except ImportFormatError as exc:
        stop()
        print_error(exc)
        if a.json:
            _emit_json({"ok": False, "error": str(exc), "output": None})
        return EXIT_INPUT
    stop()
    doc = {"ok": True, **res.to_dict(), "output": a.output}
    if a.json:
        _emit_json(doc)
        return EXIT_OK
    how = f"detected: {res.how}" if res.detected else "given"
    con.print(f"format {res.format} ({how}): {res.conversations} read -> {res.count} records -> {a.output}")
    for label, role in res.labels.items():
        con.print(f"  speaker {label!r}: {role}")
    if res.changes:
        con.print("changed or dropped:")
        for reason, n in sorted(res.changes.items(), key=lambda kv: (-kv[1], kv[0])):
            con.print(f"  {n:>8,}  {reason}")
    for s in res.skipped:
        con.print(f"[yellow]skipped[/] {s['where']}: {s['reason']}")
    if res.skipped_count > len(res.skipped):
        con.print(f"[yellow]... {res.skipped_count - len(res.skipped)} more skipped (--json lists the first "
                  f"{len(res.skipped)})")
    return EXIT_OK


def run_data(a) -> int:
    from training.data.schema import DatasetError, check_records

    con = _console()
    if a.data_cmd is None:
        con.print("usage: duet data {import,check,curate,versions,show,diff} ...")
        return EXIT_INPUT
    if a.data_cmd == "import":
        return _run_import(a)
    if a.data_cmd in ("versions", "show", "diff"):
        return _run_versions(a)
    from training.data.dataset import tokenizer_counter

    try:
        counter = tokenizer_counter(a.tokenizer) if a.tokenizer else None
    except DatasetError as exc:
        print_error(exc)
        return EXIT_INPUT
    if a.data_cmd == "check":
        from training.data.schema import scan_jsonl

        records, errors, line_problems = [], [], []
        for f in a.files:
            try:
                recs, lines = scan_jsonl(f)
                records.extend(recs)
                line_problems.extend(lines)
            except DatasetError as exc:
                errors.append(str(exc))
        problems = sorted(line_problems + check_records(records, a.max_len, counter), key=lambda p: (p.file, p.line))
        bad = sum(1 for r in records if not r.ok) + len(line_problems)
        doc = {"files": a.files, "records": len(records), "invalid_records": bad, "errors": errors,
               "tokens_counted_with": "tokenizer" if counter else "estimate (~4 characters a token)",
               "problems": [p.to_dict() for p in problems]}
        if a.json:
            _emit_json(doc)
        else:
            for e in errors:
                con.print(f"[red]{e}")
            for p in problems:
                con.print(f"[red]{p}")
            con.print(f"{len(records)} records, {bad} invalid, {len(problems)} problems")
        return EXIT_INPUT if problems or errors else EXIT_OK
    from memory_sync.workspace import WorkspaceError
    from roles.architect import Architect

    try:
        arch = Architect(a.workspace, session_title="data curate")
        res = arch.curate(a.files, a.name, a.test_frac, a.seed, strict=a.strict, max_tokens=a.max_len,
                          count_tokens=counter, reasoning_target=a.reasoning_target)
    except (DatasetError, WorkspaceError) as exc:
        print_error(exc)
        for p in getattr(exc, "problems", [])[:100]:
            con.print(f"  {p}")
        if a.json:
            _emit_json({"ok": False, "error": str(exc),
                        "problems": [p.to_dict() for p in getattr(exc, "problems", [])]})
        return EXIT_INPUT
    if a.json:
        _emit_json(res)
    else:
        c = res["manifest"]["counts"]
        con.print(f"dataset {a.name} @ {res['content_hash'][:12]}: {c['train']} train, {c['test']} test, "
                  f"{c['quarantine']} quarantined, {c['duplicates_removed']} duplicates removed, "
                  f"{c['near_duplicate_pairs']} near-duplicate pairs kept together -> {res['path']}")
        for w in res["manifest"]["warnings"]:
            con.print(f"[yellow]warning:[/] {w}")
    return EXIT_OK




def _run_versions(a) -> int:
    """`duet data versions | show | diff` over training/data/versions.py (the dashboard's Datasets pages
    call the same functions)."""
    from training.data import versions
    from training.data.schema import DatasetError

    con = _console()
    try:
        if a.data_cmd == "versions":
            doc = {"versions": versions.list_versions(a.workspace)}
            lines = [f"{v['name']}@{v['hash']}  {v['kind']}  {v['counts'].get('train', 0)} train / "
                     f"{v['counts'].get('test', 0)} test / {v['counts'].get('quarantine', 0)} quarantined"
                     for v in doc["versions"]] or ["no dataset versions (duet data curate FILE --name NAME)"]
        elif a.data_cmd == "show":
            doc = versions.overview(versions.resolve(a.workspace, a.version))
            c = doc["manifest"]["counts"]
            lines = [f"{doc['name']}@{doc['hash']}: {c.get('train')} train, {c.get('test')} test, "
                     f"{c.get('quarantine')} quarantined, {c.get('duplicates_removed')} duplicates removed",
                     f"reasoning {doc['reasoning']}", f"categories {doc['categories']}",
                     f"tokens ({doc['tokens']['counted_with']}): {doc['tokens']['percentiles']}"]
            lines += [f"quarantined {q['file']}:{q['line']}: " + "; ".join(f"{p.get('field')}: {p.get('message')}"
                                                                       for p in q["problems"]) for q in doc["quarantine"]]
        else:
            doc = versions.diff(versions.resolve(a.workspace, a.a), versions.resolve(a.workspace, a.b))
            lines = [", ".join(f"{k} {v}" for k, v in doc["counts"].items())]
            lines += [f"+ {i}" for i in doc["added"]] + [f"- {i}" for i in doc["removed"]]
            lines += [f"~ {i}" for i in doc["changed"]] + [f"> {m['id']} {m['from']} -> {m['to']}" for m in doc["moved"]]
    except (DatasetError, OSError, ValueError) as exc:
        print_error(exc)
        return EXIT_INPUT
    if a.json:
        _emit_json(doc)
    else:
        for line in lines:
            con.print(line, markup=False, highlight=False)
    return EXIT_OK
