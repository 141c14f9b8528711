"""Which loader a run uses (torch or DALI) and building it: the trainer makes one call, create_loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rela.config import Config
from rela.data.budget import BudgetSampler
from rela.data.dali import DaliImageSource, DaliTrainLoader, dali_available
from rela.data.datasets import ArrayImages, DatasetSplits, FileImages
from rela.data.interfaces import ImageSource, TrainLoader
from rela.data.loader import TorchImageSource, TorchTrainLoader, default_decode_size
from rela.data.views import Normalize, ViewSpec, view_modes
from rela.errors import RelaError


@dataclass
class Loaders:
    use_dali: bool
    train_source: ImageSource  # the training set's plain images: the target bank's pass, the kNN/probe
    train_loader: TrainLoader  # the training set's two-view batches


def create_loaders(cfg: Config, splits: DatasetSplits, sampler: BudgetSampler, normalize: Normalize,
                   device: torch.device, seed: int, method_views: tuple[ViewSpec, ViewSpec]) -> Loaders:
    """The loader `cfg.loader` asks for (see choose_loader), over the training split. `method_views`: the SSL
    method's own pair of views (its class's `views`), for its phase."""
    use_dali = choose_loader(cfg, device, splits.train)
    source = build_image_source(cfg, splits.train, device, use_dali)
    loader = build_train_loader(cfg, splits, source, sampler, normalize, seed, use_dali, method_views)
    return Loaders(use_dali, source, loader)


def choose_loader(cfg: Config, device: torch.device, dataset: ArrayImages | FileImages | None = None) -> bool:
    """True for DALI. auto: DALI where it is installed, the run is on a GPU and the dataset is image files:
    DALI's gain is decoding JPEGs on the GPU (nvJPEG); an in-memory dataset (digits, CIFAR) already lives
    on the device whole, where the torch loader's views are one batched pass. `dataset` None (not known):
    auto decides on the device alone."""
    if cfg.loader == "torch" or (cfg.loader == "auto" and device.type != "cuda"):
        return False
    if cfg.loader == "dali":
        if not dali_available():
            raise RelaError("--loader dali: NVIDIA DALI is not installed (pip install '.[dali]')")
        return True
    if dataset is not None and not isinstance(dataset, FileImages):
        return False
    return dali_available()


def build_image_source(cfg: Config, dataset: ArrayImages | FileImages, device: torch.device,
                       use_dali: bool) -> ImageSource:
    if use_dali:
        return DaliImageSource(dataset, device, num_threads=max(1, cfg.workers), skip_corrupt=cfg.skip_corrupt)
    return TorchImageSource(dataset, device, num_workers=cfg.workers, skip_corrupt=cfg.skip_corrupt)


def build_train_loader(cfg: Config, splits: DatasetSplits, source: ImageSource, sampler: BudgetSampler,
                       normalize: Normalize, seed: int, use_dali: bool,
                       method_views: tuple[ViewSpec, ViewSpec]) -> TrainLoader:
    """The DALI loader reads `splits.train` itself; the torch loader reads through `source`."""
    crop_min = {cfg.method: cfg.byol_crop_min_scale, "rela": cfg.rela_crop_min_scale}  # None: the views' own
    modes = view_modes(cfg.rela_views, cfg.byol_blur, cfg.method, method_views)
    decode_size = splits.native_size or default_decode_size(cfg.image_size)
    if use_dali:
        return DaliTrainLoader(splits.train, sampler, image_size=cfg.image_size, normalize=normalize, seed=seed,
                               device=source.device, crop_min_scale=crop_min, view_modes=modes, view_mode=cfg.method,
                               num_threads=max(1, cfg.workers), skip_corrupt=cfg.skip_corrupt, decode_size=decode_size)
    return TorchTrainLoader(source, sampler, image_size=cfg.image_size, decode_size=decode_size,
                            normalize=normalize, seed=seed, crop_min_scale=crop_min, view_modes=modes,
                            view_mode=cfg.method)
