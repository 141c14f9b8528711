"""backbone.safetensors: a run's backbone for users without this package.

The tensors are backbone.pt's state dict under the same names; the metadata (strings, as safetensors keeps
them) says what they fit: `arch` (a timm:NAME backbone loads into timm.create_model(NAME, num_classes=0);
resnet18/resnet50 into torchvision's model of that name, its fc left out), `image_size`, and the
normalisation `mean` and `std` as JSON lists.

    from safetensors.torch import load_file
    state = load_file("RUN/backbone.safetensors")
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rela.utils.checkpoint import atomic_write_bytes


def write_backbone_safetensors(backbone_pt: Path) -> Path:
    """Writes backbone.safetensors beside `backbone_pt` (a dict of arch, state_dict, image_size, mean, std)."""
    from safetensors.torch import save

    saved = torch.load(backbone_pt, map_location="cpu", weights_only=True)
    # safetensors refuses tensors that share storage or are not contiguous: give each its own
    tensors = {name: t.detach().contiguous().clone() for name, t in saved["state_dict"].items()}
    metadata = {"format": "pt", "arch": str(saved["arch"]), "image_size": str(saved["image_size"]),
                "mean": json.dumps(list(saved["mean"])), "std": json.dumps(list(saved["std"]))}
    return atomic_write_bytes(backbone_pt.with_suffix(".safetensors"), save(tensors, metadata=metadata))
