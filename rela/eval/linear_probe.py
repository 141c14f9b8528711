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
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(train_x) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            loss = nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return (classifier(val_x).argmax(1) == val_y).float().mean().item()


def linear_probe_reference(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                           num_classes: int, *, epochs: int = 100, batch_size: int = 128, lr: float = 3e-4,
                           seed: int = 0) -> tuple[float, float]:
    """The reference code's protocol (LINs-lab/ReLA metrics/lineareval.py): a linear layer on the raw
    features, Adam at a constant 3e-4, the held-out accuracy after every epoch; returns the mean and the
    sample standard deviation (0..1) of the last 3 epochs' accuracies."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    accuracies = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            loss = nn.functional.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracies.append((classifier(val_x).argmax(1) == val_y).float().mean().item())
    last = torch.tensor(accuracies[-3:], dtype=torch.float64)
    return last.mean().item(), (last.std().item() if len(last) > 1 else 0.0)
