"""A cheap kNN monitor during training: the online backbone's kNN top-1 on fixed, seeded subsets of the
training and held-out splits, logged with the time it was reached (time-to-accuracy curves)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rela.data.interfaces import ImageSource
from rela.data.views import Normalize
from rela.eval.features import extract_features
from rela.eval.knn import knn_accuracy
from rela.utils.distributed import DistInfo


class KnnMonitor:
    """kNN top-1 (percent) of `backbone` with the train subset as the memory bank and the val subset as
    queries. Collective under torchrun (features are extracted on each rank's share and gathered: the subsets
    are small, so every rank holds both whole and runs the one-process kNN)."""

    def __init__(self, train_source: ImageSource, val_source: ImageSource, *, num_classes: int, size: int,
                 crop_fraction: float, normalize: Normalize, dist: DistInfo, k: int, temperature: float,
                 batch_size: int, autocast_dtype: torch.dtype | None):
        self.train_source, self.val_source = train_source, val_source
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.common = dict(size=size, crop_fraction=crop_fraction, normalize=normalize, batch_size=batch_size,
                           dist=dist, autocast_dtype=autocast_dtype)

    @staticmethod
    def subset_indices(n: int, size: int, seed: int) -> np.ndarray:
        """`size` of `n` indices, the same for every run with this seed (sorted: read in file order)."""
        return np.sort(np.random.default_rng([seed, 7]).permutation(n)[:min(size, n)])

    def __call__(self, backbone: nn.Module) -> float:
        train_x, train_y = extract_features(backbone, self.train_source, **self.common)
        val_x, val_y = extract_features(backbone, self.val_source, **self.common)
        accuracy = knn_accuracy(train_x, train_y, val_x, val_y, self.num_classes, k=min(self.k, len(train_x)),
                                temperature=self.temperature)
        return 100 * accuracy
