"""The torch loader: uint8 images to the device, then both views made there in one batched pass.

Files are decoded by DataLoader workers to a fixed square (`decode_size`); in-memory arrays live on the
device whole. Augmentation runs at the step that consumes the batch (see views.py), so switching from
RELA's views to the method's takes effect at exactly the step asked for. Each batch carries its dataset
indices (the target bank is looked up by them), labels (for the online probe) and the view mode it was
made with. `TorchImageSource` and `TorchTrainLoader` are rela/data/interfaces.py's `ImageSource` and
`TrainLoader`.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rela.data.budget import BudgetSampler
from rela.data.datasets import ArrayImages, CorruptImageError, FileImages
from rela.data.interfaces import ImageSource, TrainBatch
from rela.data.views import VIEW_MODES, Normalize, ViewSpec, augment_batch, resize_center_crop, view_pair
from rela.errors import RelaError
from rela.utils.signals import ignore_stop_signals


def _pil_square(image: np.ndarray, size: int, crop_fraction: float | None) -> np.ndarray:
    """uint8 HWC -> uint8 (3, size, size): squashed whole (crop_fraction None) or resized + center crop."""
    from PIL import Image

    pil = Image.fromarray(image)
    if crop_fraction is None:
        pil = pil.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    else:
        w, h = pil.size
        short = round(size / crop_fraction)
        new_w, new_h = (short, max(short, round(h * short / w))) if w <= h else (max(short, round(w * short / h)), short)
        pil = pil.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    return np.array(pil).transpose(2, 0, 1)  # writable: torch.from_numpy warns on read-only arrays


class _DecodedFiles(Dataset):
    """Worker side: decode one file to a uint8 square. A corrupt file yields a flag, not an exception,
    so the main process can name it or skip it."""

    def __init__(self, files: FileImages, size: int, crop_fraction: float | None):
        self.files, self.size, self.crop_fraction = files, size, crop_fraction

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            image = self.files.read(index, draft_size=self.size)
            return torch.from_numpy(_pil_square(image, self.size, self.crop_fraction)), index, ""
        except CorruptImageError as err:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), index, str(err)


def _collate(samples):
    images, indices, errors = zip(*samples)
    return torch.stack(images), torch.tensor(indices, dtype=torch.int64), list(errors)


class _PassBatches:
    """A DataLoader's batch_sampler whose batches are those of the pass in progress. A DataLoader iterates
    its batch_sampler in the main process at the start of every pass and sends the indices to its workers,
    so persistent workers decode each pass's own batches (each epoch's own subset) without being started
    again. `generation` counts the passes, so a pass can tell that a newer one took the workers over."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.generation = 0

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the CPU) on `device` without stalling the host: a copy from pageable memory waits for the
    stream, so on CUDA the tensor goes through pinned memory (torch's caching host allocator keeps the
    buffer until the copy has run) and is copied with non_blocking=True. Elsewhere: `t.to(device)`."""
    if device.type != "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class TorchImageSource:
    """Yields (uint8 images (B, 3, S, S) on the device, indices (B,) int64 CPU) for given index batches.

    mode 'train': the whole image squashed to `size` (files) or as stored (arrays), for random crops;
    mode 'eval': resize + center crop to `size` (deterministic; the prior's and the probe's input).
    """

    def __init__(self, dataset: ArrayImages | FileImages, device: torch.device, *, num_workers: int = 0,
                 skip_corrupt: bool = False):
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self.skipped: set[int] = set()
        self._decoders: dict[tuple[int, float | None], tuple[DataLoader, _PassBatches]] = {}
        self._resident = None
        if isinstance(dataset, ArrayImages):
            self._resident = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous().to(self.device)

    def iterate(self, batches: Sequence[np.ndarray], *, mode: str = "eval", size: int,
                crop_fraction: float = 0.875, also_record: set[int] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`also_record`: a set that gets this pass's skipped indices too (the train loader counts its own)."""
        if self._resident is not None:
            for batch in batches:
                index = torch.as_tensor(np.asarray(batch), dtype=torch.int64)
                images = self._resident.index_select(0, to_device_async(index, self.device))
                if mode == "eval":
                    images = (resize_center_crop(images, size, crop_fraction) * 255).round_().to(torch.uint8)
                yield images, index
            return
        for images, index, errors in self._decoded(batches, size, None if mode == "train" else crop_fraction):
            bad = [i for i, e in enumerate(errors) if e]
            if bad:
                if not self.skip_corrupt:
                    raise RelaError(errors[bad[0]])
                self.skipped.update(int(index[i]) for i in bad)
                if also_record is not None:
                    also_record.update(int(index[i]) for i in bad)
                keep = torch.tensor([i for i in range(len(errors)) if not errors[i]], dtype=torch.int64)
                # A batch of only bad files stays, as black images: every rank must run the same steps.
                if len(keep):
                    images, index = images[keep], index[keep]
            yield to_device_async(images, self.device), index

    def _decoded(self, batches: Sequence[np.ndarray], size: int, crop_fraction: float | None):
        """(uint8 images, indices, errors) per batch, decoded by DataLoader workers that are started once
        per (size, crop) and kept (persistent_workers): an epoch or an evaluation pass starts no processes.
        Two passes of one (size, crop) do not interleave: the newer takes the workers over, and the older
        raises if resumed (the training epoch and the kNN monitor's pass in its middle use two)."""
        key = (size, crop_fraction)
        if key not in self._decoders:
            plan = _PassBatches()
            loader = DataLoader(_DecodedFiles(self.dataset, size, crop_fraction), batch_sampler=plan,
                                num_workers=self.num_workers, collate_fn=_collate, worker_init_fn=ignore_stop_signals,
                                pin_memory=self.device.type == "cuda", persistent_workers=self.num_workers > 0,
                                prefetch_factor=4 if self.num_workers else None)
            self._decoders[key] = loader, plan
        loader, plan = self._decoders[key]
        plan.batches = [list(map(int, b)) for b in batches]
        plan.generation += 1
        token = plan.generation
        decoded = iter(loader)
        while True:
            if plan.generation != token:
                raise RuntimeError("this pass over the images was superseded by a newer one of the same size")
            batch = next(decoded, None)
            if batch is None:
                return
            yield batch

    def load(self, indices: torch.Tensor, *, size: int, crop_fraction: float) -> torch.Tensor:
        """Eval-preprocessed uint8 images for arbitrary indices, decoded by a thread pool (PIL releases
        the GIL while decoding and resizing). A corrupt file raises, or gives a black image when
        skipping (its row is never trained on)."""
        batch = np.asarray(indices, dtype=np.int64)
        if self._resident is not None:
            return next(self.iterate([batch], mode="eval", size=size, crop_fraction=crop_fraction))[0]

        def one(i: int) -> torch.Tensor:
            try:
                return torch.from_numpy(_pil_square(self.dataset.read(i, size), size, crop_fraction))
            except CorruptImageError:
                if not self.skip_corrupt:
                    raise
                self.skipped.add(i)
                return torch.zeros(3, size, size, dtype=torch.uint8)

        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            images = torch.stack(list(pool.map(one, batch.tolist())))
        return to_device_async(images, self.device)


class TorchTrainLoader:
    """Budgeted two-view training batches. `set_view_mode(mode)` ("rela", or the method's name) applies from
    the next batch."""

    def __init__(self, source: TorchImageSource, sampler: BudgetSampler, *, image_size: int, decode_size: int,
                 normalize: Normalize, seed: int, view_mode: str = "byol",
                 crop_min_scale: dict[str, float | None] | None = None,
                 view_modes: dict[str, tuple[ViewSpec, ViewSpec]] | None = None):
        self.source, self.sampler = source, sampler
        self.image_size, self.decode_size = image_size, decode_size
        self.normalize = normalize
        self.crop_min_scale = crop_min_scale or {}
        self.view_modes = view_modes or VIEW_MODES
        self.generator = torch.Generator(device=source.device)
        self.generator.manual_seed(seed)
        self.labels = torch.as_tensor(source.dataset.labels, dtype=torch.int64).to(source.device)
        self._skipped: set[int] = set()
        self.set_view_mode(view_mode)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def view_mode(self) -> str:
        return self._view_mode

    @property
    def skipped(self) -> set[int]:
        """Corrupt files met in training batches (the bank's and evaluation's passes count theirs apart)."""
        return self._skipped

    def set_view_mode(self, mode: str) -> None:
        self._view_mode = mode
        self.views = view_pair(mode, self.crop_min_scale.get(mode), self.view_modes)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        batches = self.sampler.batches(epoch, start_step)
        for images, index in self.source.iterate(batches, mode="train", size=self.decode_size,
                                                 also_record=self._skipped):
            mode, (spec1, spec2) = self.view_mode, self.views
            v1 = self.normalize(augment_batch(images, spec1, self.image_size, self.generator))
            v2 = self.normalize(augment_batch(images, spec2, self.image_size, self.generator))
            index = to_device_async(index, self.source.device)
            yield TrainBatch(v1, v2, index, self.labels.index_select(0, index), views=mode)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "view_mode": self.view_mode}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.set_view_mode(state["view_mode"])


def default_decode_size(image_size: int) -> int:
    """Files are decoded to a square a bit larger than the output so random crops keep detail."""
    return int(math.ceil(image_size * 1.15))
