"""Frozen-backbone features of a split, without augmentation: each rank encodes a contiguous block of it;
`extract_local_features` keeps the block on its rank (the training split under torchrun: ImageNet's
1.28M x 2048 float32 features are 10.5 GB whole), `extract_features` gathers the blocks on every rank."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rela.data.datasets import DatasetSplits
from rela.data.interfaces import ImageSource
from rela.data.views import Normalize, resize_center_crop
from rela.utils import distributed as dist_utils
from rela.utils.progress import Progress


def center_crop_fraction(splits: DatasetSplits) -> float:
    """The centre crop of the prior's pass and of evaluation: small in-memory images keep their whole frame."""
    return 1.0 if splits.in_memory else 0.875


def bank_crop_fraction(splits: DatasetSplits, given: float | None) -> float:
    """The centre crop of the prior's pass (--bank-crop-fraction): `given`, or evaluation's (center_crop_fraction).
    The reference code resizes and centre-crops the whole frame (1.0) at every dataset."""
    return center_crop_fraction(splits) if given is None else given


@torch.no_grad()
def extract_local_features(backbone: nn.Module, source: ImageSource, *, size: int, crop_fraction: float,
                           normalize: Normalize, batch_size: int, dist: dist_utils.DistInfo, autocast_dtype=None,
                           show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's block of the split, nothing gathered: (features (n, F) float32, labels (n,) int64, dataset
    indices (n,) int64), all on `source.device`. Rank r encodes the contiguous block
    [r N / W, (r + 1) N / W) in dataset order, so the blocks in rank order are the whole split (less any
    corrupt file skipped); n is about N / W. Without a process group: the whole split."""
    n = len(source.dataset)
    bounds = np.linspace(0, n, dist.world_size + 1).astype(int)
    mine = np.arange(bounds[dist.rank], bounds[dist.rank + 1])
    batches = [mine[s: s + batch_size] for s in range(0, len(mine), batch_size)]
    was_training = backbone.training
    backbone.eval()
    feats, indices = [], []
    bar = Progress(total=len(mine), desc=f"features {source.dataset.name}", unit="img",
                   enabled=dist.is_main and show_progress)
    for images, index in source.iterate(batches, mode="eval", size=size, crop_fraction=crop_fraction):
        x = normalize(resize_center_crop(images, size, 1.0))
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            feats.append(backbone(x).float())
        indices.append(index)
        bar.update(len(index))
    bar.close()
    backbone.train(was_training)
    device = source.device
    local = torch.cat(feats) if feats else torch.zeros((0, backbone.feature_dim), device=device)
    local_index = torch.cat(indices).to(device) if indices else torch.zeros(0, dtype=torch.int64, device=device)
    labels = torch.as_tensor(source.dataset.labels, device=device)[local_index]
    return local, labels, local_index


def extract_features(backbone: nn.Module, source: ImageSource, *, size: int, crop_fraction: float, normalize: Normalize,
                     batch_size: int, dist: dist_utils.DistInfo, autocast_dtype=None, show_progress: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (features (N, F) float32, labels (N,)) in dataset order on `source.device`, on every rank: each
    rank encodes its block (extract_local_features) and the blocks are gathered (collective). For splits
    small enough to hold whole on every GPU: the validation split, the kNN monitor's subsets."""
    local, local_labels, local_index = extract_local_features(
        backbone, source, size=size, crop_fraction=crop_fraction, normalize=normalize, batch_size=batch_size,
        dist=dist, autocast_dtype=autocast_dtype, show_progress=show_progress)
    if not dist.enabled:
        return local, local_labels
    # Ranks may hold fewer rows than their block when corrupt files were skipped: gather true counts.
    counts = dist_utils.row_counts(len(local), local.device)
    features = dist_utils.all_gather_rows(local, counts)
    index = dist_utils.all_gather_rows(local_index, counts)
    return features, torch.as_tensor(source.dataset.labels, device=local.device)[index]
