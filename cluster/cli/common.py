"""What the command modules share: the --workspace argument."""

from __future__ import annotations

import argparse
import os


def workspace_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", "-w", default=os.environ.get("DUET_WORKSPACE", "duet-workspace"),
                   help="workspace directory (default: ./duet-workspace or $DUET_WORKSPACE)")


