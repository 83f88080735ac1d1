"""duet's benchmarks: each writes benchmarks/results/<name>-<machine>.json (``python -m benchmarks`` runs them all)."""

from __future__ import annotations

import os
import platform


def cpu_machine() -> str:
    """The name CPU results are filed under: architecture and core count (e.g. cpu-x86_64-2c)."""
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def cpu_kind(features: dict | None = None) -> str:
    """The kind of CPU a speed figure holds for, by the best matmul it has: amx (AMX-BF16 tiles),
    avx512bf16 (native bf16 dot products), avx512, avx2 or base. Results whose value depends on it
    (speed, trl_compare) are filed under ``<name>-<machine>-<kind>.json``, one file a kind."""
    f = features or cpu_features()
    for kind, flag in (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if f.get(flag):
            return kind
    return "base"


def cpu_features() -> dict:
    """What decided a CPU plan, named beside every CPU figure: the model, the core count, and the flags
    that make bf16 native (AVX512-BF16, AMX) or fast matmul possible at all (AVX-512, AVX2)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(),
            **{k: k in flags for k in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def versions(*packages: str) -> dict[str, str]:
    """The installed versions of ``packages``, for a result's record."""
    from importlib.metadata import version

    return {p: version(p) for p in packages}
