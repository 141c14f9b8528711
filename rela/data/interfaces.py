"""What the trainer asks of a data loader, as two Protocols that the torch and DALI loaders both satisfy.

`ImageSource` gives plain (un-augmented) uint8 images by index: the target bank's pass over the training
set and the evaluation's feature extraction read through it. `TrainLoader` gives the budgeted two-view
batches of training. The torch loader (rela/data/loader.py) and the DALI one (rela/data/dali/) are
interchangeable behind these types; rela/data/factory.py picks one. Both are `runtime_checkable`, so a
test can assert `isinstance(loader, TrainLoader)`; that checks the names, not the signatures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from rela.data.datasets import ArrayImages, FileImages


@dataclass
class TrainBatch:
    view1: torch.Tensor  # (B, 3, S, S) normalised, model dtype/layout
    view2: torch.Tensor
    index: torch.Tensor  # (B,) int64 dataset indices, on the device
    label: torch.Tensor  # (B,) int64, on the device
    views: str  # the view mode both views were made with: "rela", or the method's name ("byol", "dino", ...)


@runtime_checkable
class ImageSource(Protocol):
    """uint8 images by dataset index, on `device`. A corrupt file raises a CorruptImageError naming it,
    or (skipping corrupt files) is dropped and its index added to `skipped`."""

    @property
    def dataset(self) -> ArrayImages | FileImages: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def skipped(self) -> set[int]:
        """Indices of the corrupt files dropped so far."""
        ...

    def load(self, indices: torch.Tensor, *, size: int, crop_fraction: float) -> torch.Tensor:
        """(len(indices), 3, size, size) uint8 on `device`, row k the image of indices[k], resized so its
        shorter side is round(size / crop_fraction) and center-cropped; a skipped file gives a black row."""
        ...

    def iterate(self, batches: Sequence[np.ndarray], *, mode: str = "eval", size: int,
                crop_fraction: float = 0.875) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch of indices, in order: (uint8 images (B, 3, S, S) on `device`, indices (B,) int64).
        mode 'eval': as `load`; mode 'train': the whole image squashed to `size` (files) or as stored
        (arrays), for random crops."""
        ...


@runtime_checkable
class TrainLoader(Protocol):
    """Budgeted two-view training batches (the sampler's batches, in its order)."""

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def view_mode(self) -> str:
        """The views the loader makes now: "rela", or the method's name."""
        ...

    @property
    def skipped(self) -> set[int]:
        """Indices of the corrupt files dropped so far."""
        ...

    def set_view_mode(self, mode: str) -> None:
        """Every batch yielded after this call has `mode`'s views (and says so in `TrainBatch.views`)."""
        ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        """The epoch's batches from `start_step` on (to resume mid-epoch)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
