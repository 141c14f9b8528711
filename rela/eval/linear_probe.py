"""Offline linear probe on frozen features: standardised features, a linear layer, AdamW + cosine."""
from __future__ import annotations

import torch
from torch import nn


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                          num_classes: int, *, epochs: int = 100, batch_size: int = 1024, lr: float = 1e-2,
                          weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Top-1 accuracy (0..1) of a linear classifier trained on (train_x, train_y), tested on val."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classifier = _seeded_linear(train_x.shape[1], num_classes, train_x.device, seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train_x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in _epochs(classifier, optimizer, train_x, train_y, epochs, batch_size, seed, scheduler):
        pass
    return _accuracy(classifier, val_x, val_y)


def linear_probe_reference(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                           num_classes: int, *, epochs: int = 100, batch_size: int = 128, lr: float = 3e-4,
                           seed: int = 0) -> tuple[float, float]:
    """The reference code's protocol (LINs-lab/ReLA metrics/lineareval.py): a linear layer on the raw
    features, Adam at a constant 3e-4, the held-out accuracy after every epoch; returns the mean and the
    sample standard deviation (0..1) of the last 3 epochs' accuracies."""
    classifier = _seeded_linear(train_x.shape[1], num_classes, train_x.device, seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    accuracies = [_accuracy(classifier, val_x, val_y)
                  for _ in _epochs(classifier, optimizer, train_x, train_y, epochs, batch_size, seed)]
    last = torch.tensor(accuracies[-3:], dtype=torch.float64)
    return last.mean().item(), (last.std().item() if len(last) > 1 else 0.0)


def _seeded_linear(in_features: int, num_classes: int, device: torch.device, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation leaves the global generator alone
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes).to(device)


def _epochs(classifier: nn.Linear, optimizer: torch.optim.Optimizer, train_x: torch.Tensor, train_y: torch.Tensor,
            epochs: int, batch_size: int, seed: int, scheduler=None):
    """Trains one epoch (a seeded shuffle, cross-entropy) per iteration; yields after each."""
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


@torch.no_grad()
def _accuracy(classifier: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return (classifier(x).argmax(1) == y).float().mean().item()
