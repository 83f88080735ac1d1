"""What the command modules share: the --workspace argument, and where runs live without a cluster."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=os.environ.get("DUET_WORKSPACE", "duet-workspace"),
                   help="workspace directory (default: ./duet-workspace or $DUET_WORKSPACE)")




def local_data_dir(a: argparse.Namespace) -> Path:
    """Where runs live for a command that works on them in this process: --data-dir, else the
    workspace's own executor folder (<workspace>/.duet/executor, where `duet train` and `duet demo` put them)."""
    return Path(a.data_dir) if a.data_dir else Path(a.workspace).resolve() / ".duet" / "executor"
