"""The ``duet`` command line: one table of commands (COMMANDS) mapping names to plain functions.

Contract (DESIGN.md): every reporting command accepts ``--json`` and prints one JSON document on
stdout; exit codes 0 ok, 1 invalid input, 2 refused (plan, policy, conflict),
3 infrastructure unavailable. Heavy libraries are imported inside the commands, so ``duet --help``
stays fast and the design host needs no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from cluster import output
from cluster.cli import chat, cluster, dashboard, data, export, memory, monitor, sweep, train
from cluster.console import console, print_error
from cluster.output import EXIT_INPUT, EXIT_OK


@dataclass
class Command:
    help: str
    setup: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]



COMMANDS: dict[str, Command] = {
    "demo": Command("the main job, embedded, offline", cluster.setup_demo, cluster.run_demo),
    "up": Command("start the embedded cluster + stores for this workspace [--dashboard]", cluster.setup_up_dashboard,
                  cluster.run_up),
    "down": Command("stop what duet started for this workspace", cluster.setup_up, cluster.run_down),
    "status": Command("what runs for this workspace", cluster.setup_status, cluster.run_status),
    "node": Command("start | join | stop a node of a two-host cluster", cluster.setup_node, cluster.run_node),
    "data": Command("import | check | curate datasets", data.setup_data, data.run_data),
    "plan": Command("estimate memory for a model + preset on a GPU size", train.setup_plan, train.run_plan),
    "run": Command("curate, plan and train a run config through the actors", train.setup_run, train.run_run),
    "train": Command("train an architect's plan in this process [--resume]", train.setup_train, train.run_train),
    "runs": Command("list | show | cancel | pause | resume | move runs on the executors", train.setup_runs, train.run_runs),
    "watch": Command("live view of a run (step/ETA, loss sparklines, tokens/s, memory, alerts)",
                     monitor.setup_watch, monitor.run_watch),
    "merge": Command("merge a run's adapter into its base (16/32-bit, verified)", train.setup_merge, train.run_merge),
    "sweep": Command("a grid of runs (--grid KEY=V1,V2) and their comparison | sweep show ID",
                     sweep.setup_sweep, sweep.run_sweep),
    "export": Command("a finished run -> a verified GGUF + Ollama Modelfile [--quant f16|bf16|q8_0] [--fetch]",
                      export.setup_export, export.run_export),
    "chat": Command("talk to a run's model, compare it (--compare base|RUN|RUN@STEP), keep your judgements",
                    chat.setup_chat, chat.run_chat),
    "session": Command("start | log | note | decide | list | show | resume | handoff | close work sessions",
                       memory.setup_session, memory.run_session),
    "memory": Command("sync | search | hypothesize | promote | backup | restore memory",
                      memory.setup_memory, memory.run_memory),
    "infra": Command("up | down | status for Prometheus + Alertmanager", monitor.setup_infra, monitor.run_infra),
    "dashboard": Command("the web view: runs (live), datasets, sessions, the cluster; prints a login URL",
                         dashboard.setup_dashboard, dashboard.run_dashboard),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with the CLI contract's exit code for a bad argument (1: invalid input; argparse's
    own 2 means "refused" here)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="duet", description="Two machines fine-tune a personal LLM together.",
        epilog="exit codes: 0 ok, 1 invalid input, 2 refused (plan, policy, conflict), 3 infrastructure unavailable")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.setup(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # `duet session log ID --role user some text`: words after an option belong to the text
        if isinstance(getattr(a, "text", None), list) and extra[0] == "--":  # `-- -text`: all of it is text
            a.text += extra[1:]
        elif isinstance(getattr(a, "text", None), list) and not any(x.startswith("-") for x in extra):
            a.text += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not a.command:
        parser.print_help()
        return EXIT_OK
    cmd = COMMANDS[a.command]
    if getattr(a, "json", False) and argv is None:  # a process of its own (not a test calling main())
        output.stdout_for_json_only()
    try:
        return cmd.run(a)
    except KeyboardInterrupt:
        console().print("[red]interrupted[/]")
        return 130
    except Exception as exc:  # errors a command left to this table; never a traceback (DUET_DEBUG=1 shows it)
        if os.environ.get("DUET_DEBUG"):
            raise
        return _fail(a, exc, output.exit_code_for(exc), unexpected=not _expected(exc))


def _expected(exc: BaseException) -> bool:
    """Errors about the input, a policy or a service (as opposed to a bug in duet)."""
    from infra.services import ServiceError
    from memory_sync.secret_scan import ScannerError, SecretFound
    from memory_sync.workspace import WorkspaceError

    return isinstance(exc, (ValueError, OSError, SecretFound, ScannerError, WorkspaceError, ServiceError, UnicodeError))


def _fail(a, exc: BaseException, code: int, unexpected: bool = False) -> int:
    msg = output.describe(exc)
    if unexpected:
        msg = (f"unexpected {type(exc).__name__}: {msg} (a bug in duet: please report it; "
               "DUET_DEBUG=1 shows the traceback)")
    print_error(msg)
    if getattr(a, "json", False):
        output.emit_json({"ok": False, "error": msg, "exit_code": code})
    return code

