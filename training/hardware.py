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
    bf16: bool
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    torch_version: str | None
    cuda_version: str | None

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


def bf16_native(compute_capability: str | None) -> bool:
    """bf16 only where the GPU has it in hardware: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes on a T4 or V100, where bf16 is emulated (slow)."""
    try:
        major = int(str(compute_capability).split(".")[0])
    except (ValueError, TypeError):
        return False
    return major >= 8


def probe(data_dir: str | os.PathLike = ".") -> HardwareProfile:
    import psutil

    vm = psutil.virtual_memory()
    disk_dir = os.fspath(data_dir) if os.path.exists(data_dir) else "."
    gpu_name = gpu_total = gpu_free = cc = None
    bf16 = False
    torch_version = cuda_version = None
    device = "cpu"
    try:
        import torch

        torch_version = torch.__version__
        if torch.cuda.is_available():
            device = "cuda"
            props = torch.cuda.get_device_properties(0)
            gpu_name = props.name
            gpu_free, gpu_total = torch.cuda.mem_get_info(0)
            cc = f"{props.major}.{props.minor}"
            bf16 = bf16_native(cc)
            cuda_version = torch.version.cuda
    except ImportError:
        pass
    return HardwareProfile(
        hostname=os.environ.get("DUET_HOST_NAME") or socket.gethostname(), device=device,
        gpu_name=gpu_name, gpu_total_bytes=gpu_total, gpu_free_bytes=gpu_free,
        compute_capability=cc, bf16=bf16, cpu_count=os.cpu_count() or 1,
        ram_total_bytes=vm.total, ram_available_bytes=vm.available,
        disk_free_bytes=shutil.disk_usage(disk_dir).free, torch_version=torch_version,
        cuda_version=cuda_version,
    )


def describe(hw: HardwareProfile) -> str:
    gib = 1024 ** 3
    if hw.device == "cuda":
        return (f"{hw.gpu_name} ({(hw.gpu_total_bytes or 0) / gib:.1f} GiB, cc {hw.compute_capability}, "
                f"bf16={'yes' if hw.bf16 else 'no'})")
    return f"CPU x{hw.cpu_count} ({platform.machine()}), {hw.ram_available_bytes / gib:.1f} GiB RAM free"
