"""Hardware profile of the executor's host: GPU (name, VRAM, compute capability, bf16) or CPU,
RAM and disk. torch is imported lazily so the architect can use the dataclass without it."""

from __future__ import annotations

import os
import platform
import shutil
import socket
from dataclasses import asdict, dataclass


@dataclass
class HardwareProfile:
    hostname: str
    device: str  # "cuda" or "cpu"
    gpu_name: str | None
    gpu_total_bytes: int | None
    gpu_free_bytes: int | None
    compute_capability: str | None
    bf16: bool  # native bf16: GPU compute capability >= 8.0, or a CPU with AVX512-BF16/AMX that a probe confirms
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    torch_version: str | None
    cuda_version: str | None
    cpu_bf16_speedup: float | None = None  # CPU only: bf16 / fp32 matmul speed, measured (below 1: emulated)
    gpu_count: int = 0  # GPUs torch sees on this host (data-parallel workers: one a GPU)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    @property
    def memory_budget_bytes(self) -> int:
        """What a plan may use: VRAM on a GPU, available RAM on a CPU."""
        if self.device == "cuda" and self.gpu_total_bytes:
            return self.gpu_total_bytes
        return self.ram_available_bytes


def available_cpus() -> int:
    """The cores this process may actually run on: its CPU affinity (taskset, a container's cpuset),
    capped by a cgroup v2 CPU quota (``cpu.max``, e.g. ``docker --cpus``) where one is set. Torch's
    default, ``os.cpu_count()``, counts the whole machine: more threads than cores slows every step."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def bf16_native(compute_capability: str | None) -> bool:
    """bf16 only where the GPU has it in hardware: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes on a T4 or V100, where bf16 is emulated (slow)."""
    try:
        major = int(str(compute_capability).split(".")[0])
    except (ValueError, TypeError):
        return False
    return major >= 8


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the instructions oneDNN's bf16 GEMMs use
CPU_BF16_MIN_SPEEDUP = 1.5  # a bf16 matmul must beat fp32 by this much to count as native (measured here: 3x)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_CPU_BF16: dict = {}


def cpu_bf16(flags: set[str] | None = None) -> dict:
    """Whether this CPU runs bf16 matmuls natively: an AVX512-BF16 or AMX flag, confirmed by a short
    probe (a 512x512x2048 matmul in bf16 against fp32, best of 5; ~50 ms). Without the flags it is never
    native (a CPU that emulates bf16, AVX2 only as most laptops, runs it slower than fp32); this
    machine's probe still runs, so a plan that asks for bf16 here can be told how slow it is. ``flags``
    given (a test): no probe without bf16 flags. Cached."""
    if flags is None and _CPU_BF16:
        return dict(_CPU_BF16)
    have = sorted(set(flags if flags is not None else cpu_flags()) & set(CPU_BF16_FLAGS))
    out = {"flags": have, "speedup": None, "native": False}
    if have or flags is None:  # this machine: measured either way, so a refusal of emulated bf16 can name it
        try:
            import time

            import torch

            a32, b32 = torch.randn(512, 2048), torch.randn(2048, 512)
            best = {}
            for dt in (torch.float32, torch.bfloat16):
                a, b = a32.to(dt), b32.to(dt)
                torch.mm(a, b)
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    torch.mm(a, b)
                    ts.append(time.perf_counter() - t)
                best[dt] = min(ts)
            out["speedup"] = round(best[torch.float32] / max(best[torch.bfloat16], 1e-9), 2)
            out["native"] = bool(have) and out["speedup"] >= CPU_BF16_MIN_SPEEDUP
        except ImportError:
            pass
    if flags is None:
        _CPU_BF16.update(out)
    return out


def memory_limit() -> int | None:
    """``DUET_MEMORY_LIMIT`` (e.g. ``12GiB``, ``8000MB``, bytes): the most training memory duet plans with
    on this host (VRAM on a GPU host, RAM on a CPU one), for a GPU or a box shared with other work.
    Set it in the environment of `duet node start/join`; the node's executor inherits it."""
    import re

    raw = os.environ.get("DUET_MEMORY_LIMIT", "").strip()
    if not raw:
        return None
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?", raw, re.I)
    if not m:
        raise ValueError(f"DUET_MEMORY_LIMIT={raw!r}: give a size such as 12GiB, 8000MB or a byte count")
    unit = (m.group(2) or "B").upper().rstrip("B")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise ValueError(f"DUET_MEMORY_LIMIT={raw!r}: must be above 0")
    return value


def probe(data_dir: str | os.PathLike = ".") -> HardwareProfile:
    import psutil

    vm = psutil.virtual_memory()
    disk_dir = os.fspath(data_dir) if os.path.exists(data_dir) else "."
    gpu_name = gpu_total = gpu_free = cc = None
    gpu_count = 0
    bf16 = False
    torch_version = cuda_version = None
    device = "cpu"
    try:
        import torch

        torch_version = torch.__version__
        if torch.cuda.is_available():
            device = "cuda"
            gpu_count = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            gpu_name = props.name
            gpu_free, gpu_total = torch.cuda.mem_get_info(0)
            cc = f"{props.major}.{props.minor}"
            bf16 = bf16_native(cc)
            cuda_version = torch.version.cuda
    except ImportError:
        pass
    cpu_bf16_speedup = None
    if device == "cpu":
        c = cpu_bf16()
        bf16, cpu_bf16_speedup = c["native"], c["speedup"]
    ram_total, ram_free = vm.total, vm.available
    limit = memory_limit()
    if limit is not None:  # DUET_MEMORY_LIMIT: what duet may plan with here (the rest is someone else's)
        if device == "cuda":
            gpu_total, gpu_free = min(gpu_total, limit), min(gpu_free, limit)
        else:
            ram_total, ram_free = min(ram_total, limit), min(ram_free, limit)
    return HardwareProfile(
        hostname=os.environ.get("DUET_HOST_NAME") or socket.gethostname(), device=device,
        gpu_name=gpu_name, gpu_total_bytes=gpu_total, gpu_free_bytes=gpu_free,
        compute_capability=cc, bf16=bf16, cpu_count=available_cpus(),
        ram_total_bytes=ram_total, ram_available_bytes=ram_free,
        disk_free_bytes=shutil.disk_usage(disk_dir).free, torch_version=torch_version,
        cuda_version=cuda_version, cpu_bf16_speedup=cpu_bf16_speedup, gpu_count=gpu_count,
    )


def describe(hw: HardwareProfile) -> str:
    gib = 1024 ** 3
    if hw.device == "cuda":
        return (f"{hw.gpu_name} ({(hw.gpu_total_bytes or 0) / gib:.1f} GiB, cc {hw.compute_capability}, "
                f"bf16={'yes' if hw.bf16 else 'no'})")
    bf16 = f", bf16 native ({hw.cpu_bf16_speedup}x fp32)" if hw.bf16 else ""
    return f"CPU x{hw.cpu_count} ({platform.machine()}){bf16}, {hw.ram_available_bytes / gib:.1f} GiB RAM free"
