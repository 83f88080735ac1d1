"""duet's benchmarks: each writes benchmarks/results/<name>-<machine>.json (``python -m benchmarks`` runs them all)."""

from __future__ import annotations

import os
import platform


def cpu_machine() -> str:
    """The name CPU results are filed under: architecture and core count (e.g. cpu-x86_64-2c)."""
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def versions(*packages: str) -> dict[str, str]:
    """The installed versions of ``packages``, for a result's record."""
    from importlib.metadata import version

    return {p: version(p) for p in packages}
