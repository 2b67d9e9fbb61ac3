"""Device choice shared by training, inference and evaluation: auto → CUDA, then MPS, then CPU."""

from __future__ import annotations

import torch

from xiaolm.errors import XiaolmError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.split(":")[0] not in DEVICES:
        raise XiaolmError(f"unknown device {name!r}", where="device", hint="use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XiaolmError("device=cuda but no CUDA GPU is visible", hint="use device=auto or device=cpu")
    return torch.device(name)


def resolve_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for autocast, None for plain fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None  # CPU: bf16 (dtype=bf16) pays only on AMX CPUs, and there it cost the demo accuracy
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated tensors on CUDA, resident set size of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # VmHWM: this process's own peak (ru_maxrss would carry a launcher's peak over fork + exec)
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS
