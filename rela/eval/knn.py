"""kNN classifier on frozen features: cosine similarity, temperature-weighted votes (Wu et al. 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(val_x), chunk):
        similarity = val_x[start: start + chunk] @ train_x.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes, device=val_x.device)
        # exp(sim / T) overflows float32 for T below ~0.011 (1 / 88.7); shifting by the row's largest
        # similarity scales the row's votes by one positive factor, so the winner is the same.
        weights = ((top_sim - top_sim.amax(1, keepdim=True)) / temperature).exp()
        votes.scatter_add_(1, train_y[top_idx], weights)
        correct += (votes.argmax(1) == val_y[start: start + chunk]).sum().item()
    return correct / len(val_x)
