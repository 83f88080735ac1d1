"""Where the CLI writes: with --json, stdout carries the JSON document and nothing else.

Kept in a module of its own so that `python -m cluster.cli` (whose module is ``__main__``) and the
command modules it imports share one state.
"""

from __future__ import annotations

import json
import os
import sys

# The CLI's exit codes (DESIGN.md): ok, invalid input, refused (plan, policy, conflict), infrastructure unavailable.
EXIT_OK, EXIT_INPUT, EXIT_REFUSED, EXIT_INFRA = 0, 1, 2, 3

_json_out = None  # with --json: the real stdout, kept for the document alone


def emit_json(doc: dict) -> None:
    out = _json_out or sys.stdout
    out.write(json.dumps(doc, indent=2, default=str) + "\n")
    out.flush()


def stdout_for_json_only() -> None:
    """Whatever else writes to fd 1 (Ray's driver prints node-death notices there, libraries print
    banners) goes to stderr from here on; ``emit_json`` writes to the real stdout."""
    global _json_out
    sys.stdout.flush()
    _json_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)


_CONTROL = None


def terminal_safe(text: str) -> str:
    """Stored text made safe to print on a terminal: control characters (ESC and every other C0/C1
    code but newline and tab, DEL, and the bidirectional overrides) are shown as visible escapes
    (``\\x1b``, ``\\u202e``), so a logged turn cannot write the clipboard (OSC 52), clear the screen,
    hide text or reorder a line."""
    global _CONTROL
    import re

    if _CONTROL is None:
        _CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
    if not isinstance(text, str):
        text = str(text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an error a command did not handle itself (DESIGN.md's contract): a secret or
    a policy refusal 2, an unreachable service 3, anything about the input 1."""
    from infra.services import ServiceError
    from memory_sync.secret_scan import ScannerError, SecretFound
    from memory_sync.workspace import NotAWorkspace, WorkspaceError

    if isinstance(exc, (SecretFound, ScannerError)) or (isinstance(exc, WorkspaceError) and not isinstance(exc, NotAWorkspace)):
        return EXIT_REFUSED
    if isinstance(exc, (ServiceError, ConnectionError, TimeoutError)):
        return EXIT_INFRA
    return EXIT_INPUT


def describe(exc: BaseException) -> str:
    """One line (or a short block) for a person: the message, or what an OSError was about (for an
    error raised inside a Ray actor, its cause's message, not the remote traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, OSError) and exc.filename is not None and not str(exc).startswith(str(exc.filename)):
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc).strip()
    return text or type(exc).__name__


# -- argument types: a number that is read is finite and in range, and 0 is a value, not "unset" --------

def int_arg(lo: int | None = None, hi: int | None = None):
    def parse(text: str) -> int:
        import argparse

        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside {lo if lo is not None else '-inf'}.."
                                             f"{hi if hi is not None else 'inf'}")
        return value
    parse.__name__ = "whole number"
    return parse


def float_arg(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    def parse(text: str) -> float:
        import argparse
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise argparse.ArgumentTypeError(
                f"{value} is outside {'(' if lo_open else '['}{lo if lo is not None else '-inf'}, "
                f"{hi if hi is not None else 'inf'}{')' if hi_open else ']'}")
        return value
    parse.__name__ = "number"
    return parse
