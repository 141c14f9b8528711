"""The two evaluations of frozen features, as the end of a run and `python -m rela.eval` both report them:
the linear probe (either protocol) and the kNN classifier, top-1 in percent."""
from __future__ import annotations

import torch

from rela.eval.knn import knn_accuracy
from rela.eval.linear_probe import linear_probe_accuracy, linear_probe_reference

PROBE_PROTOCOLS = ("project", "reference")


def probe_and_knn(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                  num_classes: int, *, protocol: str, probe_epochs: int, seed: int, knn_k: int,
                  knn_temperature: float) -> dict:
    """train_x, val_x: (N, F) float32 features; *_y: (N,) int64 labels. The probe's protocol is 'project'
    (standardised features, AdamW + cosine, the final accuracy) or 'reference' (raw features, Adam 3e-4, mean
    and std of the last 3 epochs' accuracies)."""
    if protocol == "reference":
        linear, linear_std = linear_probe_reference(train_x, train_y, val_x, val_y, num_classes,
                                                    epochs=probe_epochs, seed=seed)
    elif protocol == "project":
        linear, linear_std = linear_probe_accuracy(train_x, train_y, val_x, val_y, num_classes,
                                                   epochs=probe_epochs, seed=seed), None
    else:
        raise ValueError(f"probe protocol {protocol!r} is not one of {PROBE_PROTOCOLS}")
    knn = knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=knn_k, temperature=knn_temperature)
    return {"linear_probe_top1": 100 * linear, "probe_protocol": protocol,
            # the reference protocol's spread over its last 3 epochs (None for the project's single number)
            "linear_probe_top1_std": None if linear_std is None else 100 * linear_std,
            "knn_top1": 100 * knn}
