"""A run's backbone on disk: backbone.pt (`save_backbone` / `load_backbone`, the one writer and reader) and
backbone.safetensors, the same weights for users without this package.

backbone.pt is a dict: `arch` (a name of rela.models.backbones), `state_dict`, `image_size`, and the
normalisation `mean` and `std` as lists. backbone.safetensors holds the same state dict under the same names;
its metadata (strings, as safetensors keeps them) says what they fit: `arch` (a timm:NAME backbone loads into
timm.create_model(NAME, num_classes=0); resnet18/resnet50 into torchvision's model of that name, its fc left
out), `image_size`, and `mean` and `std` as JSON lists.

    from safetensors.torch import load_file
    state = load_file("RUN/backbone.safetensors")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rela.utils.files import atomic_torch_save, atomic_write_bytes, cpu_copy, load_plain


def save_backbone(path: Path, backbone: nn.Module, *, arch: str, image_size: int, mean: Sequence[float],
                  std: Sequence[float]) -> Path:
    """Writes backbone.pt atomically: the backbone's weights (copied to the CPU) and what they fit."""
    return atomic_torch_save({"arch": arch, "state_dict": cpu_copy(backbone.state_dict()), "image_size": image_size,
                              "mean": list(mean), "std": list(std)}, path)


def load_backbone(path: Path) -> Any:
    """What a backbone.pt holds (the dict `save_backbone` writes, or whatever a foreign file holds), read
    weights-only (`load_plain`): a crafted file runs nothing. Errors go to the caller, who names the file."""
    return load_plain(path)


def write_backbone_safetensors(backbone_pt: Path) -> Path:
    """Writes backbone.safetensors beside `backbone_pt` (a dict of arch, state_dict, image_size, mean, std)."""
    from safetensors.torch import save

    saved = load_backbone(backbone_pt)
    # safetensors refuses tensors that share storage or are not contiguous: give each its own
    tensors = {name: t.detach().contiguous().clone() for name, t in saved["state_dict"].items()}
    metadata = {"format": "pt", "arch": str(saved["arch"]), "image_size": str(saved["image_size"]),
                "mean": json.dumps(list(saved["mean"])), "std": json.dumps(list(saved["std"]))}
    return atomic_write_bytes(backbone_pt.with_suffix(".safetensors"), save(tensors, metadata=metadata))
