"""The torch loader: uint8 images to the device, then both views made there in one batched pass.

For training, DataLoader workers decode each file at its own aspect ratio, scaled down to a shorter side of
at most `decode_size`, into a fixed canvas that batches them (`frame_canvas`), and pass on each image's
extent, so the random crops are drawn within the image's own frame as torchvision's RandomResizedCrop and
the DALI loader draw them. In-memory arrays live on the device whole. Augmentation runs at the step that
consumes the batch (see views.py), so switching from RELA's views to the method's takes effect at exactly
the step asked for. Each batch carries its dataset indices (the target bank is looked up by them), labels
(for the online probe) and the view mode it was made with. `TorchImageSource` and `TorchTrainLoader` are
rela/data/interfaces.py's `ImageSource` and `TrainLoader`.
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


# A training canvas is decode_size x ceil(decode_size * 4/3), images laid landscape: ImageNet's commonest
# shape (500 x 375) fills it at a shorter side of decode_size, a more elongated image is scaled down until it
# fits (its shorter side then below decode_size). A portrait image is stored transposed: the canvas holds
# a third more pixels than decode_size squared, where a square one for both orientations would hold 78% more.
CANVAS_ASPECT = 4 / 3


def canvas_shape(decode_size: int) -> tuple[int, int]:
    """(rows, columns) of the training canvas of files decoded at `decode_size`."""
    return decode_size, math.ceil(decode_size * CANVAS_ASPECT)


def frame_canvas(image: np.ndarray, decode_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 HWC -> (uint8 (3, *canvas_shape(decode_size)), (height, width) of the image as laid in it).

    The image keeps its aspect ratio, scaled down (never up) until its shorter side is at most decode_size
    and its longer at most the canvas's width. It lies at the top left, transposed if it is taller than wide
    (views.augment_batch turns its crops back). Its last row and column are repeated once past it: roi_align's
    bilinear samples reach up to half a pixel beyond a box's last pixel centre, and must meet the image
    there, not the black padding.
    """
    from PIL import Image

    rows, columns = canvas_shape(decode_size)
    height, width = image.shape[:2]
    scale = min(1.0, rows / min(height, width), columns / max(height, width))
    short = min(rows, max(1, round(min(height, width) * scale)))
    long = min(columns, max(1, round(max(height, width) * scale)))
    new_h, new_w = (short, long) if height <= width else (long, short)
    pil = Image.fromarray(image)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
    laid = np.asarray(pil).transpose(2, 0, 1)  # (3, new_h, new_w)
    if new_h > new_w:
        laid = laid.transpose(0, 2, 1)
    a, b = laid.shape[1:]
    canvas = np.zeros((3, rows, columns), dtype=np.uint8)
    canvas[:, :a, :b] = laid
    if b < columns:
        canvas[:, :a, b] = canvas[:, :a, b - 1]
    if a < rows:
        canvas[:, a, :b + 1] = canvas[:, a - 1, :b + 1]
    return canvas, (new_h, new_w)


# How a worker lays out a decoded file: whole and squashed to size x size ("square", ImageSource's mode
# 'train'), resized and centre-cropped ("center", mode 'eval'), or at its own aspect ratio in the training
# canvas ("frame", TorchTrainLoader's input).
LAYOUTS = ("square", "center", "frame")


class _DecodedFiles(Dataset):
    """Worker side: decode one file and lay it out (`LAYOUTS`); yields (uint8 image, (height, width) of the
    image in it, index, error). A corrupt file yields an error message, not an exception, so the main
    process can name it or skip it; its image is black."""

    def __init__(self, files: FileImages, size: int, layout: str, crop_fraction: float):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.files, self.size, self.layout, self.crop_fraction = files, size, layout, crop_fraction

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        shape = canvas_shape(self.size) if self.layout == "frame" else (self.size, self.size)
        try:
            image = self.files.read(index, draft_size=self.size)
            if self.layout == "frame":
                laid, extent = frame_canvas(image, self.size)
            else:
                laid = _pil_square(image, self.size, self.crop_fraction if self.layout == "center" else None)
                extent = shape
            return torch.from_numpy(laid), extent, index, ""
        except CorruptImageError as err:
            return torch.zeros(3, *shape, dtype=torch.uint8), (self.size, self.size), index, str(err)


def _collate(samples):
    images, extents, indices, errors = zip(*samples)
    return (torch.stack(images), torch.tensor(extents, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64),
            list(errors))


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

    mode 'train': the whole image squashed to `size` (files) or as stored (arrays);
    mode 'eval': resize + center crop to `size` (deterministic; the prior's and the probe's input).
    `frames` gives the training loader's input: files at their own aspect ratio, with their extents.
    """

    def __init__(self, dataset: ArrayImages | FileImages, device: torch.device, *, num_workers: int = 0,
                 skip_corrupt: bool = False):
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self.skipped: set[int] = set()
        self._decoders: dict[tuple[int, str, float], tuple[DataLoader, _PassBatches]] = {}
        self._resident = None
        if isinstance(dataset, ArrayImages):
            self._resident = torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous().to(self.device)

    def iterate(self, batches: Sequence[np.ndarray], *, mode: str = "eval", size: int,
                crop_fraction: float = 0.875, also_record: set[int] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`also_record`: a set that gets this pass's skipped indices too (the train loader counts its own)."""
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if self._resident is not None:
            for batch in batches:
                index = torch.as_tensor(np.asarray(batch), dtype=torch.int64)
                images = self._resident.index_select(0, to_device_async(index, self.device))
                if mode == "eval":
                    images = (resize_center_crop(images, size, crop_fraction) * 255).round_().to(torch.uint8)
                yield images, index
            return
        layout = "square" if mode == "train" else "center"
        for images, _, index in self._kept(batches, size, layout, crop_fraction, also_record):
            yield images, index

    def frames(self, batches: Sequence[np.ndarray], *, size: int, also_record: set[int] | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """The training input, per batch: (uint8 images on the device, their extents, indices (B,) int64 CPU).
        Files: images (B, 3, *canvas_shape(size)), each laid out by `frame_canvas`, and extents (B, 2) int64 on
        the device, each image's (height, width) in it; views.augment_batch crops within them. Arrays: the
        images as stored and extents None (each fills its array)."""
        if self._resident is not None:
            for images, index in self.iterate(batches, mode="train", size=size):
                yield images, None, index
            return
        for images, extents, index in self._kept(batches, size, "frame", 1.0, also_record):
            yield images, to_device_async(extents, self.device), index

    def _kept(self, batches: Sequence[np.ndarray], size: int, layout: str, crop_fraction: float,
              also_record: set[int] | None):
        """(uint8 images on the device, extents, indices) of decoded files, per batch; a corrupt file raises,
        or (skipping) is dropped and recorded."""
        for images, extents, index, errors in self._decoded(batches, size, layout, crop_fraction):
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
                    images, extents, index = images[keep], extents[keep], index[keep]
            yield to_device_async(images, self.device), extents, index

    def _decoded(self, batches: Sequence[np.ndarray], size: int, layout: str, crop_fraction: float):
        """(uint8 images, extents, indices, errors) per batch, decoded by DataLoader workers that are started
        once per (size, layout, crop) and kept (persistent_workers): an epoch or an evaluation pass starts no
        processes. Two passes of one key do not interleave: the newer takes the workers over, and the older
        raises if resumed (the training epoch and the kNN monitor's pass in its middle use two)."""
        key = (size, layout, crop_fraction if layout == "center" else 1.0)
        if key not in self._decoders:
            plan = _PassBatches()
            loader = DataLoader(_DecodedFiles(self.dataset, size, layout, crop_fraction), batch_sampler=plan,
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
        for images, extents, index in self.source.frames(batches, size=self.decode_size, also_record=self._skipped):
            mode, (spec1, spec2) = self.view_mode, self.views
            v1 = self.normalize(augment_batch(images, spec1, self.image_size, self.generator, extents))
            v2 = self.normalize(augment_batch(images, spec2, self.image_size, self.generator, extents))
            index = to_device_async(index, self.source.device)
            yield TrainBatch(v1, v2, index, self.labels.index_select(0, index), views=mode)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "view_mode": self.view_mode}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.set_view_mode(state["view_mode"])


def default_decode_size(image_size: int) -> int:
    """Files are decoded with a shorter side a bit larger than the output so random crops keep detail."""
    return int(math.ceil(image_size * 1.15))
