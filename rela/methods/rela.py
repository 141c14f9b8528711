"""RELA: regress static targets from a frozen prior, and decide when to hand over to BYOL.

The phase loss is the mean over the two views of 1 - cos(W h(view), y_i). W is a fixed random linear
map by default (as in the reference code), trainable with --rela-train-map.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rela.ops import rela_loss


class RelaMap(nn.Module):
    """W: backbone features -> target width. Random and frozen unless trainable."""

    def __init__(self, feature_dim: int, target_dim: int, trainable: bool, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(target_dim, feature_dim)
        bound = 1.0 / feature_dim ** 0.5
        weight.uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.T.to(features.dtype)


def rela_step(backbone: nn.Module, rela_map: RelaMap, view1: torch.Tensor, view2: torch.Tensor,
              targets: torch.Tensor, *, fused: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """No target-network forward. targets: (B, k) rows of the bank. Returns (loss, features (2B, F))."""
    features = backbone(torch.cat([view1, view2]))
    predicted = rela_map(features)
    return rela_loss(predicted, torch.cat([targets, targets]).to(predicted.dtype), fused=fused), features


class PhaseController:
    """The adaptive end of the RELA phase, on the device, updated without a host sync.

    fast = 0.999 fast + 0.001 loss; slow = 0.99 slow + 0.01 fast (the updated fast); starting at 1.0
    and 2.0; rho = exp(-max(slow - fast, 0)); the phase is over once rho >= threshold. The host reads
    `done` only when it logs; `plateau_step` records the step at which rho first crossed.
    """

    def __init__(self, device: torch.device, threshold: float = 0.995, fast_decay: float = 0.999,
                 slow_decay: float = 0.99):
        self.threshold, self.fast_decay, self.slow_decay = threshold, fast_decay, slow_decay
        self.fast = torch.tensor(1.0, dtype=torch.float64, device=device)
        self.slow = torch.tensor(2.0, dtype=torch.float64, device=device)
        self.rho = torch.tensor(0.0, dtype=torch.float64, device=device)
        self.done = torch.tensor(False, device=device)
        self.plateau_step = torch.tensor(-1, dtype=torch.int64, device=device)

    def earliest_plateau_step(self) -> int:
        """The first step at which rho can reach the threshold, whatever the loss does. 1 - cos is at
        most 2, and a loss pinned there brings the averages together fastest."""
        fast, slow = 1.0, 2.0
        for step in range(1, 10**6):
            fast = self.fast_decay * fast + (1 - self.fast_decay) * 2.0
            slow = self.slow_decay * slow + (1 - self.slow_decay) * fast
            if math.exp(-max(slow - fast, 0.0)) >= self.threshold:
                return step
        return 10**6

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        """loss: 0-dim, the same on every rank (average it across ranks first)."""
        self.fast.mul_(self.fast_decay).add_(loss.detach().to(torch.float64), alpha=1 - self.fast_decay)
        self.slow.mul_(self.slow_decay).add_(self.fast, alpha=1 - self.slow_decay)
        torch.exp(-(self.slow - self.fast).clamp(min=0), out=self.rho)
        crossed = self.rho >= self.threshold
        self.plateau_step.copy_(torch.where(crossed & ~self.done, step, self.plateau_step))
        self.done.logical_or_(crossed)

    def state_dict(self) -> dict:
        return {name: getattr(self, name).clone() for name in ("fast", "slow", "rho", "done", "plateau_step")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)
