"""kNN classifier on frozen features: cosine similarity, temperature-weighted votes (Wu et al. 2018).

Under torchrun the training features stay on their ranks (`dist` enabled): each rank finds, for every
validation row, the k most similar rows of its own block, the ranks' candidates (V x k each) are gathered,
and the k best of them vote, as one process's top-k over all rows would."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rela.utils import distributed as dist_utils
from rela.utils.distributed import DistInfo


@torch.no_grad()
def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, *, k: int = 20, temperature: float = 0.07, chunk: int = 1024,
                 dist: DistInfo = DistInfo()) -> float:
    """Top-1 accuracy (0..1) of the kNN vote. train_x (n, F) float32, train_y (n,) int64: the training rows (with
    `dist` enabled, this rank's block of them); val_x (V, F), val_y (V,): the whole validation split, the same on
    every rank. With `dist` enabled: collective, every rank returns the same accuracy, the one-process one (the
    similarities of a pair are the same numbers; only exact ties in the k-th place may pick another neighbour)."""
    if dist.enabled:
        return _sharded_knn_accuracy(train_x, train_y, val_x, val_y, num_classes, k=k, temperature=temperature,
                                     chunk=chunk)
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(val_x), chunk):
        similarity = val_x[start: start + chunk] @ train_x.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        correct += _correct_votes(top_sim, train_y[top_idx], val_y[start: start + chunk], num_classes,
                                  temperature).item()
    return correct / len(val_x)


def _correct_votes(top_sim: torch.Tensor, top_y: torch.Tensor, val_y: torch.Tensor, num_classes: int,
                   temperature: float) -> torch.Tensor:
    """How many queries the temperature-weighted vote of their neighbours (similarities (c, k), labels (c, k))
    classifies as `val_y` (c,): a 0-d int64 tensor."""
    votes = torch.zeros(len(top_sim), num_classes, device=top_sim.device)
    # exp(sim / T) overflows float32 for T below ~0.011 (1 / 88.7); shifting by the row's largest
    # similarity scales the row's votes by one positive factor, so the winner is the same.
    weights = ((top_sim - top_sim.amax(1, keepdim=True)) / temperature).exp()
    votes.scatter_add_(1, top_y, weights)
    return (votes.argmax(1) == val_y).sum()


def _sharded_knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          num_classes: int, *, k: int, temperature: float, chunk: int) -> float:
    world_size = torch.distributed.get_world_size()
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    k = min(k, sum(dist_utils.row_counts(len(train_x), train_x.device)))
    local_k = min(k, len(train_x))
    correct = torch.zeros((), dtype=torch.int64, device=val_x.device)
    for start in range(0, len(val_x), chunk):  # the same chunks on every rank: each is one gather
        queries = val_x[start: start + chunk]
        top_sim, top_idx = (queries @ train_x.T).topk(local_k, dim=1)
        # A block with fewer than k rows pads its candidates with -inf, which never win a place.
        candidates_sim = top_sim.new_full((len(queries), k), float("-inf"))
        candidates_sim[:, :local_k] = top_sim
        candidates_y = train_y.new_zeros((len(queries), k))
        candidates_y[:, :local_k] = train_y[top_idx]
        # (W * c, k) in rank order -> (c, W * k): each query's candidates from every rank
        every_sim = dist_utils.all_gather_rows(candidates_sim, [len(queries)] * world_size)
        every_y = dist_utils.all_gather_rows(candidates_y, [len(queries)] * world_size)
        every_sim = every_sim.view(world_size, len(queries), k).permute(1, 0, 2).reshape(len(queries), -1)
        every_y = every_y.view(world_size, len(queries), k).permute(1, 0, 2).reshape(len(queries), -1)
        top_sim, best = every_sim.topk(k, dim=1)
        correct += _correct_votes(top_sim, every_y.gather(1, best), val_y[start: start + chunk], num_classes,
                                  temperature)
    return correct.item() / len(val_x)
