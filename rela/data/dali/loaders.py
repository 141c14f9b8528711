"""The DALI loaders: rela/data/interfaces.py's `TrainLoader` and `ImageSource`, made by DALI.

On a GPU, JPEGs are decoded by nvJPEG and both views are made there; on the CPU the same graphs run on
CPU operators. How the host feeds them (and why the views, the view switch and bad files behave as
they do) is in driver.py; the graphs are in pipelines.py.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

import numpy as np
import torch

from rela.data.budget import BudgetSampler
from rela.data.dali.driver import FedPipeline, HostBatch, draw_view_params, eval_params
from rela.data.datasets import ArrayImages, FileImages
from rela.data.interfaces import TrainBatch
from rela.data.loader import to_device_async
from rela.data.views import VIEW_MODES, Normalize, ViewSpec, view_pair


class DaliTrainLoader:
    """Budgeted two-view training batches made by DALI (a `TrainLoader`).

    `set_view_mode(mode)` ("rela", or the method's name) applies to every batch yielded after the call (see driver.py).
    `decode_size` is accepted for the torch loader's signature and not used: DALI crops the
    full-resolution image, as BYOL's RandomResizedCrop does, where the torch loader first scales files
    down (aspect kept) to a shorter side of decode_size to batch them.
    """

    def __init__(self, dataset: ArrayImages | FileImages, sampler: BudgetSampler, *, image_size: int,
                 normalize: Normalize, seed: int, device: torch.device | str, view_mode: str = "byol",
                 crop_min_scale: dict[str, float | None] | None = None,
                 view_modes: dict[str, tuple[ViewSpec, ViewSpec]] | None = None, num_threads: int = 4,
                 skip_corrupt: bool = False, decode_size: int | None = None, prefetch: int = 2):
        from rela.data.dali.pipelines import train_pipeline

        self.dataset, self.sampler = dataset, sampler
        self.image_size, self.normalize, self.seed = image_size, normalize, seed
        self.device = torch.device(device)
        self.crop_min_scale = crop_min_scale or {}
        self.view_modes = view_modes or VIEW_MODES
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.int64).to(self.device)
        # Only views that solarize in some mode get the op (BYOL's second).
        self._solarize = tuple(any(pair[v].solarize_p > 0 for pair in self.view_modes.values()) for v in (0, 1))
        graph = partial(train_pipeline, size=image_size, mean=normalize.mean.flatten().tolist(),
                        std=normalize.std.flatten().tolist(),
                        half=normalize.dtype in (torch.float16, torch.bfloat16),  # DALI has no bf16: cast after
                        channels_last=normalize.channels_last, solarize=self._solarize)
        self._pipeline = FedPipeline(dataset, self.device, graph, num_threads=num_threads,
                                     skip_corrupt=skip_corrupt, prefetch=prefetch)
        self.set_view_mode(view_mode)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def view_mode(self) -> str:
        return self._view_mode

    @property
    def skipped(self) -> set[int]:
        return self._pipeline.reader.skipped

    def set_view_mode(self, mode: str) -> None:
        self._view_mode = mode
        self.views = view_pair(mode, self.crop_min_scale.get(mode), self.view_modes)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[TrainBatch]:
        batches = self.sampler.batches(epoch, start_step)

        def inputs_for(host: HostBatch, position: int) -> dict:
            # The step's own generator: its views depend on (seed, epoch, step) only.
            rng = np.random.default_rng([self.seed % 2 ** 63, epoch, start_step + position])
            inputs = {self._pipeline.data_name: host.data}
            for v, (spec, solarize) in enumerate(zip(self.views, self._solarize), start=1):
                params = draw_view_params(spec, host.sizes, self.image_size, rng)
                if not solarize:
                    if spec.solarize_p > 0:
                        raise ValueError(f"view {v} of this loader's graph has no solarize op")
                    del params["solarize"]
                for name, value in params.items():
                    inputs[f"view{v}_{name}"] = value
            return inputs

        # A step is fed again when the mode or pair changed after it was fed, so the mode it carries
        # (key[0]) is the one its views were made with.
        for step, (view1, view2) in self._pipeline.steps(batches, inputs_for, lambda: (self.view_mode, self.views)):
            index = to_device_async(torch.from_numpy(step.host.index), self.device)
            yield TrainBatch(self._finish(view1), self._finish(view2), index, self.labels.index_select(0, index),
                             views=step.key[0])

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize.channels_last:  # DALI wrote (B, H, W, C): the same memory as NCHW channels_last
            x = x.permute(0, 3, 1, 2)
        return x.to(self.normalize.dtype)

    def state_dict(self) -> dict:
        # The views of a step are drawn from (seed, epoch, step): the mode is the only state.
        return {"view_mode": self.view_mode}

    def load_state_dict(self, state: dict) -> None:
        self.set_view_mode(state["view_mode"])


class DaliImageSource:
    """uint8 images by index made by DALI (an `ImageSource`): mode 'eval' is resize + center crop
    (deterministic; the prior's and the probe's input), mode 'train' the whole image squashed to S (files)
    or as stored (arrays). Batches come out in the order given, each index once; corrupt files raise, or
    are dropped and added to `skipped`. Indices come back on the CPU."""

    def __init__(self, dataset: ArrayImages | FileImages, device: torch.device | str, *, num_threads: int = 4,
                 skip_corrupt: bool = False, prefetch: int = 2):
        from rela.data.dali.pipelines import eval_pipeline

        self.dataset, self.device = dataset, torch.device(device)
        self._pipeline = FedPipeline(dataset, self.device, eval_pipeline, num_threads=num_threads,
                                     skip_corrupt=skip_corrupt, prefetch=prefetch)

    @property
    def skipped(self) -> set[int]:
        return self._pipeline.reader.skipped

    def iterate(self, batches: Sequence[np.ndarray], *, mode: str = "eval", size: int,
                crop_fraction: float = 0.875) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, images in self._steps(batches, mode, size, crop_fraction):
            yield images, torch.from_numpy(step.host.index)

    def load(self, indices: torch.Tensor, *, size: int, crop_fraction: float) -> torch.Tensor:
        """Eval-preprocessed uint8 images for arbitrary indices. A corrupt file raises, or gives a black
        image when skipping (its row is never trained on)."""
        batch = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        out = torch.zeros((len(batch), 3, size, size), dtype=torch.uint8, device=self.device)
        for step, images in self._steps([batch], "eval", size, crop_fraction):
            out[to_device_async(torch.from_numpy(step.host.position), self.device)] = images
        return out

    def _steps(self, batches, mode: str, size: int, crop_fraction: float):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        in_memory = not self._pipeline.reader.files

        def inputs_for(host: HostBatch, position: int) -> dict:
            return {self._pipeline.data_name: host.data,
                    **eval_params(host.sizes, mode, size, crop_fraction, in_memory)}

        for step, (images,) in self._pipeline.steps(list(batches), inputs_for):
            yield step, images
