"""Content hashes: of files (prior weights) and of a module's state (replica checks, run priors)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def state_digest(module: nn.Module, part: str = "all") -> str:
    """A hash of every parameter and buffer (part "all"), or of the parameters or the buffers alone, by name."""
    tensors = {"all": lambda: module.state_dict().items(), "parameters": module.named_parameters,
               "buffers": module.named_buffers}[part]()
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
