"""Everything Rich: the CLI's stderr console, error lines, and the Rich ``Reporter`` of the run
pipeline (roles/pipeline.py) with its plan and summary tables. Rich is imported here and under
cluster/cli/ only (tests/unit/test_structure.py checks it)."""

from __future__ import annotations

import contextlib
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_console: Console | None = None


class SafeConsole(Console):
    """A Console whose printed texts have their control characters shown as escapes
    (``cluster.output.terminal_safe``): stored text (a logged turn, a report, a file name) can never
    send escape sequences to the terminal. Rich's own styling is added after."""

    def print(self, *objects, **kw):
        from cluster.output import terminal_safe

        return super().print(*(terminal_safe(o) if isinstance(o, str) else o for o in objects), **kw)


def console() -> Console:
    """The one stderr console of the CLI (stdout is for --json documents)."""
    global _console
    if _console is None:
        _console = SafeConsole(stderr=True, soft_wrap=True)
    return _console


def print_error(exc: BaseException | str) -> None:
    """``error: <message>`` on stderr; the message is printed as it is (no Rich markup inside it)."""
    from cluster.output import describe

    msg = exc if isinstance(exc, str) else describe(exc)
    SafeConsole(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(msg)}", highlight=False)


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def plan_table(plan: dict) -> Table:
    est = plan["estimate"]
    t = Table(title=f"plan {plan['run_id']} ({plan['train']['method']} {plan['train']['phase']}, {plan['device']} "
                    f"{plan['dtype']}, {plan['trainable_params'] / 1e6:.2f} M trainable)")
    t.add_column("component")
    t.add_column("estimate", justify="right")
    for k, v in est["breakdown_bytes"].items():
        t.add_row(k, _gib(v))
    verdict = "[green]fits[/]" if est["fits"] else "[red]does not fit[/]"
    t.add_row("[bold]total (training)", f"[bold]{_gib(est['total_bytes'])}")
    for name, ph in (est.get("phases") or {}).items():
        if name != "training":
            t.add_row(f"  {name}" + (f" (on {ph['where']})" if ph.get("where") not in (None, plan["device"]) else ""),
                      _gib(ph["total_bytes"]))
    t.add_row(f"budget ({est.get('usable_fraction', 0.85):.0%} usable)", f"{_gib(est['budget_bytes'])} {verdict}")
    return t


def summary_table(s: dict, rec: dict) -> Table:
    t = Table(title="done", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("run", s["run_id"])
    t.add_row("eval loss", f"{s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}")
    t.add_row("steps", f"{s['steps']} in {s['train_s']:.1f} s ({s['tokens_per_s']} tokens/s)")
    t.add_row("peak memory", f"{rec['peak_memory'].get('rss_peak_bytes', 0) / 2**20:.0f} MiB RSS")
    t.add_row("report", s["report"])
    t.add_row("commit", str(s["run_commit"])[:12])
    t.add_row("stores", json.dumps(s["stores"]))
    if s.get("exported"):
        e = s["exported"]
        t.add_row("exported", f"{e['gguf']} ({e['bytes'] / 2**20:.1f} MiB) + Modelfile")
        v = e.get("verification") or {}
        if v.get("judge"):
            greedy = v.get("greedy") or []
            t.add_row("checked by", f"{v['judge']}: top-1 {v.get('top1_agreement')}" + (
                f", greedy {sum(g['equal_prefix'] for g in greedy)}/{sum(g['tokens'] for g in greedy)} tokens equal"
                if greedy else ""))
        t.add_row("run it", e["run_it"])
    t.add_row("wall time", f"{s['wall_s']} s")
    return t


class RichReporter:
    """The pipeline's Reporter for people: green step lines, spinners, a progress bar, tables."""

    def __init__(self, con: Console | None = None, quiet: bool = False):
        self.con = con or Console(stderr=True, quiet=quiet, soft_wrap=True)

    def heading(self, title: str) -> None:
        self.con.rule(f"[bold]{escape(title)}")

    def line(self, kind: str, text: str) -> None:
        self.con.print(f"[green]{escape(kind)}[/] {escape(text)}")

    def note(self, text: str) -> None:
        self.con.print(f"[dim]{escape(text)}[/]")

    def status(self, text: str):
        return self.con.status(escape(text))

    def plan(self, plan: dict) -> None:
        self.con.print(plan_table(plan))

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=self.con, transient=False) as prog:
            task = prog.add_task(description, total=total, info="preflight")
            yield lambda completed, info: prog.update(task, completed=completed, info=info)

    def summary(self, summary: dict, record: dict) -> None:
        self.con.print(summary_table(summary, record))
