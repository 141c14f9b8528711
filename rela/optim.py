"""Optimisers (AdamW, LARS) and the per-step learning rate: linear warm-up, then cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as BYOL trains ImageNet.

    Groups with `lars_exclude=True` (biases, norm layers) get neither weight decay nor adaptation.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where((param_norm > 0) & (grad_norm > 0),
                                        group["trust_coefficient"] * param_norm / grad_norm,
                                        torch.ones_like(param_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def _is_excluded(name: str, param: nn.Parameter) -> bool:
    """Biases and norm-layer parameters: no weight decay, no LARS adaptation (BYOL, Grill et al. 2020).

    A bias is known by its name, whatever its shape (a (1, C, 1, 1) bias broadcast over an image is
    still a bias); norm-layer scales by their shape: in these backbones and heads the only 1-D weights
    are those of BatchNorm (conv and linear weights have 2 or more dimensions).
    """
    return name.rpartition(".")[2] == "bias" or param.ndim <= 1


def build_optimizer(named_params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in named_params:
        if p.requires_grad:
            (no_decay if _is_excluded(n, p) else decay).append(p)
    if name == "lars":
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
