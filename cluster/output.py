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
