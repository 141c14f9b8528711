"""Offline linear probe on frozen features: standardised features, a linear layer, AdamW + cosine.

Under torchrun (`dist` enabled) the training rows stay on their ranks: the global row r is row r of the ranks'
blocks taken in rank order, as the gathered features were. Every rank draws the same seeded permutation of
all N rows, so the same global batches; each sums the loss over the rows of a batch it holds, the gradients
are summed over the ranks and divided by the batch's size, and every rank takes the step one process takes on
the whole batch (up to the order of float additions). The standardisation's mean and std are all-reduced in
float64. The validation features are the whole split on every rank (gathered: the small split), so every
rank scores the same classifier on the same rows and returns the same accuracy."""
from __future__ import annotations

import torch
from torch import nn

from rela.utils import distributed as dist_utils
from rela.utils.distributed import DistInfo


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          num_classes: int, *, epochs: int = 100, batch_size: int = 1024, lr: float = 1e-2,
                          weight_decay: float = 1e-4, seed: int = 0, dist: DistInfo = DistInfo()) -> float:
    """Top-1 accuracy (0..1) of a linear classifier trained on (train_x, train_y), tested on val.
    train_x (n, F) float32, train_y (n,) int64: the training rows (this rank's block with `dist` enabled:
    collective); val_x (V, F), val_y (V,): the whole validation split."""
    if dist.enabled:
        mean, std = _global_mean_std(train_x)
    else:
        mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classifier = _seeded_linear(train_x.shape[1], num_classes, train_x.device, seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-_global_rows(train_x, dist) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in _epochs(classifier, optimizer, train_x, train_y, epochs, batch_size, seed, scheduler, dist=dist):
        pass
    return _accuracy(classifier, val_x, val_y)


def linear_probe_reference(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                           num_classes: int, *, epochs: int = 100, batch_size: int = 128, lr: float = 3e-4,
                           seed: int = 0, dist: DistInfo = DistInfo()) -> tuple[float, float]:
    """The reference code's protocol (LINs-lab/ReLA metrics/lineareval.py): a linear layer on the raw
    features, Adam at a constant 3e-4, the held-out accuracy after every epoch; returns the mean and the
    sample standard deviation (0..1) of the last 3 epochs' accuracies. Rows as linear_probe_accuracy's."""
    classifier = _seeded_linear(train_x.shape[1], num_classes, train_x.device, seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    accuracies = [_accuracy(classifier, val_x, val_y)
                  for _ in _epochs(classifier, optimizer, train_x, train_y, epochs, batch_size, seed, dist=dist)]
    last = torch.tensor(accuracies[-3:], dtype=torch.float64)
    return last.mean().item(), (last.std().item() if len(last) > 1 else 0.0)


def _seeded_linear(in_features: int, num_classes: int, device: torch.device, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation leaves the global generator alone
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes).to(device)


def _global_rows(train_x: torch.Tensor, dist: DistInfo) -> int:
    return sum(dist_utils.row_counts(len(train_x), train_x.device)) if dist.enabled else len(train_x)


def _global_mean_std(train_x: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, F) mean and unbiased std (clamped at 1e-6) of every rank's rows, float32: two passes summed in
    float64 (float32 sums of 1.28M rows lose digits), all-reduced. Chunks of rows, so no float64 copy of the
    block is held. Collective."""
    sums = train_x.new_zeros(train_x.shape[1] + 1, dtype=torch.float64)
    for start in range(0, len(train_x), chunk):
        sums[:-1] += train_x[start: start + chunk].double().sum(0)
    sums[-1] = len(train_x)
    dist_utils.all_reduce_sum_(sums)
    mean, n = sums[:-1] / sums[-1], sums[-1]
    squares = train_x.new_zeros(train_x.shape[1], dtype=torch.float64)
    for start in range(0, len(train_x), chunk):
        squares += (train_x[start: start + chunk].double() - mean).square().sum(0)
    std = (dist_utils.all_reduce_sum_(squares) / (n - 1)).sqrt()
    return mean.float()[None], std.float()[None].clamp(min=1e-6)


def _epochs(classifier: nn.Linear, optimizer: torch.optim.Optimizer, train_x: torch.Tensor, train_y: torch.Tensor,
            epochs: int, batch_size: int, seed: int, scheduler=None, *, dist: DistInfo = DistInfo()):
    """Trains one epoch (a seeded shuffle, cross-entropy) per iteration; yields after each."""
    if dist.enabled:
        yield from _sharded_epochs(classifier, optimizer, train_x, train_y, epochs, batch_size, seed, scheduler)
        return
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            loss = nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        yield epoch


def _sharded_epochs(classifier: nn.Linear, optimizer: torch.optim.Optimizer, train_x: torch.Tensor,
                    train_y: torch.Tensor, epochs: int, batch_size: int, seed: int, scheduler=None):
    """_epochs over the ranks' blocks (collective): the one-process permutation of all N rows, each global batch
    split into the rows this rank holds; the summed gradients of the batch, over its size. One all-reduce a
    step, no host sync (each epoch's local rows and their batch boundaries are worked out on the CPU)."""
    counts = dist_utils.row_counts(len(train_x), train_x.device)
    rank = torch.distributed.get_rank()
    first, total = sum(counts[:rank]), sum(counts)
    params = list(classifier.parameters())
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(total, generator=generator)
        positions = ((order >= first) & (order < first + len(train_x))).nonzero().squeeze(1)  # ascending
        local_rows = (order[positions] - first).to(train_x.device)
        # batch b's local rows are local_rows[ends[b - 1]: ends[b]]
        ends = torch.searchsorted(positions, torch.arange(batch_size, total + batch_size, batch_size)).tolist()
        begin = 0
        for step, start in enumerate(range(0, total, batch_size)):
            rows = local_rows[begin: ends[step]]
            begin = ends[step]
            loss = nn.functional.cross_entropy(classifier(train_x[rows]), train_y[rows], reduction="sum")
            optimizer.zero_grad(set_to_none=False)
            loss.backward()  # a rank without rows in this batch adds zero gradients
            flat = dist_utils.all_reduce_sum_(torch.cat([p.grad.reshape(-1) for p in params]))
            flat /= min(batch_size, total - start)
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        yield epoch


@torch.no_grad()
def _accuracy(classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (classifier(x).argmax(1) == y).float().mean().item()
