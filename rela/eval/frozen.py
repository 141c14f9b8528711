"""The two evaluations of frozen features, as the end of a run and `python -m rela.eval` both report them:
the linear probe (either protocol) and the kNN classifier, top-1 in percent. `evaluate_frozen` is the whole
evaluation of a backbone (features of both splits, then the probes), the one both call.

Under torchrun the training split's features stay sharded: each rank holds its own block (about N / W rows)
and the kNN and the probe work on the blocks with small collectives (rela/eval/knn.py, linear_probe.py);
the validation split's features are gathered onto every rank (50,000 x 2048 float32 for ImageNet: 0.4 GB).
One process holds both splits whole, as before."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from rela.config import Config
from rela.data.datasets import DatasetSplits
from rela.data.interfaces import ImageSource
from rela.data.views import Normalize
from rela.eval.features import center_crop_fraction, extract_features, extract_local_features
from rela.eval.knn import knn_accuracy
from rela.eval.linear_probe import linear_probe_accuracy, linear_probe_reference
from rela.utils.distributed import DistInfo

PROBE_PROTOCOLS = ("project", "reference")


def probe_and_knn(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                  num_classes: int, *, protocol: str, probe_epochs: int, seed: int, knn_k: int,
                  knn_temperature: float, dist: DistInfo = DistInfo()) -> dict:
    """train_x, val_x: (N, F) float32 features; *_y: (N,) int64 labels. With `dist` enabled (collective) train_x
    and train_y are this rank's block of the training rows (the blocks in rank order are the split) and val_x,
    val_y the whole validation split on every rank; every rank returns the same numbers. The probe's protocol
    is 'project' (standardised features, AdamW + cosine, the final accuracy) or 'reference' (raw features,
    Adam 3e-4, mean and std of the last 3 epochs' accuracies)."""
    if protocol == "reference":
        linear, linear_std = linear_probe_reference(train_x, train_y, val_x, val_y, num_classes,
                                                    epochs=probe_epochs, seed=seed, dist=dist)
    elif protocol == "project":
        linear, linear_std = linear_probe_accuracy(train_x, train_y, val_x, val_y, num_classes,
                                                   epochs=probe_epochs, seed=seed, dist=dist), None
    else:
        raise ValueError(f"probe protocol {protocol!r} is not one of {PROBE_PROTOCOLS}")
    knn = knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=knn_k, temperature=knn_temperature,
                       dist=dist)
    return {"linear_probe_top1": 100 * linear, "probe_protocol": protocol,
            # the reference protocol's spread over its last 3 epochs (None for the project's single number)
            "linear_probe_top1_std": None if linear_std is None else 100 * linear_std,
            "knn_top1": 100 * knn}


def evaluate_frozen(backbone: nn.Module, train_source: ImageSource, val_source: ImageSource, splits: DatasetSplits,
                    cfg: Config, *, dist: DistInfo, autocast_dtype: torch.dtype | None, protocols: Sequence[str],
                    after_features: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """{protocol: probe_and_knn's results} for the backbone's features of `splits`' train and val images (read
    through the two sources, centre-cropped, normalised with the dataset's statistics; each rank encodes its
    block of each split, keeps its training block and gathers the validation split: collective), every
    protocol on the same features. The options are cfg's: image size, eval batch size, progress, probe
    epochs, seed, kNN k and temperature.
    `after_features()` runs between the features and the probes."""
    device = train_source.device
    common = dict(size=cfg.image_size, crop_fraction=center_crop_fraction(splits),
                  normalize=Normalize(splits.mean, splits.std, device), batch_size=cfg.eval_batch_size,
                  dist=dist, autocast_dtype=autocast_dtype, show_progress=cfg.progress)
    train_x, train_y, _ = extract_local_features(backbone, train_source, **common)
    val_x, val_y = extract_features(backbone, val_source, **common)
    after_features()
    return {p: probe_and_knn(train_x, train_y, val_x, val_y, splits.num_classes, protocol=p,
                             probe_epochs=cfg.probe_epochs, seed=cfg.seed, knn_k=cfg.knn_k,
                             knn_temperature=cfg.knn_temperature, dist=dist) for p in protocols}
