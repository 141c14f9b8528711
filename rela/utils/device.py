"""The device a run or an evaluation uses (--device), and its autocast dtype (--precision)."""
from __future__ import annotations

import torch

from rela.errors import RelaError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RelaError("--device cuda asked for, but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for --precision bf16, and for auto on CUDA; None (float32, no autocast) otherwise."""
    return torch.bfloat16 if (precision == "bf16" or (precision == "auto" and device.type == "cuda")) else None
