"""RELA: regress static targets from a frozen prior, and decide when to hand over to the SSL method.

The phase loss is the mean over the two views of 1 - cos(W h(view), y_i). W is a fixed random map (as
in the reference code; linear here, affine with --rela-map-bias as there), trainable with --rela-train-map.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rela.ops import rela_loss


class RelaMap(nn.Module):
    """W: backbone features -> target width. Random and frozen unless trainable; affine with `bias` (the
    reference's nn.Linear, whose initialisation it shares: uniform in +-1/sqrt(feature_dim))."""

    def __init__(self, feature_dim: int, target_dim: int, trainable: bool, seed: int, bias: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / feature_dim ** 0.5
        weight = torch.empty(target_dim, feature_dim).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(target_dim).uniform_(-bound, bound, generator=generator),
                                     requires_grad=trainable)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mapped = features @ self.weight.T.to(features.dtype)
        return mapped if self.bias is None else mapped + self.bias.to(features.dtype)


def rela_step(backbone: nn.Module, rela_map: RelaMap, view1: torch.Tensor, view2: torch.Tensor,
              targets: torch.Tensor, *, fused: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """No target-network forward. targets: (B, k) rows of the bank. Returns (loss, features (2B, F))."""
    features = backbone(torch.cat([view1, view2]))
    return rela_loss_of(rela_map, features, targets, fused=fused), features


def rela_loss_of(rela_map: RelaMap, features: torch.Tensor, targets: torch.Tensor, *, fused: bool | None) -> torch.Tensor:
    """The RELA loss of the backbone's features of both views, (2B, F), against the views' bank rows, (B, k)."""
    predicted = rela_map(features)
    return rela_loss(predicted, torch.cat([targets, targets]).to(predicted.dtype), fused=fused)


class PhaseController:
    """The adaptive end of the RELA phase, as the reference code (LINs-lab/ReLA, boostor/rela.py) has it,
    on the device and without a per-step host sync.

    At each step, first rho = exp(-max(slow - fast, 0)) from the averages as they stand, then
    fast = d_f fast + (1 - d_f) loss and slow = d_s slow + (1 - d_s) fast (the updated fast); fast and
    slow start at 1.0 and 2.0, d_f = 0.999 and d_s = 0.99. The phase is over once rho >= threshold;
    `plateau_step` records the step whose rho first crossed. In the reference the next step is the SSL
    method's. Here the host learns it one step later: `update` queues a copy of the flag to host memory
    and `ended_before` reads the copy queued a step earlier, whose transfer is long done, so no step
    waits for the device. The hand-over therefore comes exactly one step after the reference's, on every
    device alike. `averaging_scale` S shortens both averages' memory S-fold (d -> 1 - S (1 - d)), for
    runs too short for the reference constants; S = 1 is the reference.
    """

    def __init__(self, device: torch.device, threshold: float = 0.995, averaging_scale: float = 1.0):
        self.threshold = threshold
        self.fast_decay, self.slow_decay = 1 - 0.001 * averaging_scale, 1 - 0.01 * averaging_scale
        self.fast = torch.tensor(1.0, dtype=torch.float64, device=device)
        self.slow = torch.tensor(2.0, dtype=torch.float64, device=device)
        self.rho = torch.tensor(0.0, dtype=torch.float64, device=device)
        self.done = torch.tensor(False, device=device)
        self.plateau_step = torch.tensor(-1, dtype=torch.int64, device=device)
        # Two host slots: the flag after the latest update, and the one after the update before it.
        on_cuda = torch.device(device).type == "cuda"
        self._flags = torch.zeros(2, dtype=torch.bool, pin_memory=on_cuda)
        self._rhos = torch.zeros(2, dtype=torch.float64, pin_memory=on_cuda)  # rho beside each flag
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if on_cuda else None
        self._updates = 0

    def earliest_plateau_step(self) -> int:
        """The first step whose rho can reach the threshold, whatever the loss does. 1 - cos is at most
        2, and a loss pinned there brings the averages together fastest."""
        fast, slow = 1.0, 2.0
        for step in range(1, 10**6):
            if math.exp(-max(slow - fast, 0.0)) >= self.threshold:
                return step
            fast = self.fast_decay * fast + (1 - self.fast_decay) * 2.0
            slow = self.slow_decay * slow + (1 - self.slow_decay) * fast
        return 10**6

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        """loss: 0-dim, the same on every rank (average it across ranks first)."""
        torch.exp(-(self.slow - self.fast).clamp(min=0), out=self.rho)
        self.fast.mul_(self.fast_decay).add_(loss.detach().to(torch.float64), alpha=1 - self.fast_decay)
        self.slow.mul_(self.slow_decay).add_(self.fast, alpha=1 - self.slow_decay)
        crossed = self.rho >= self.threshold
        self.plateau_step.copy_(torch.where(crossed & ~self.done, step, self.plateau_step))
        self.done.logical_or_(crossed)
        slot = self._updates % 2
        self._flags[slot].copy_(self.done, non_blocking=True)
        self._rhos[slot].copy_(self.rho, non_blocking=True)
        if self._copied is not None:
            self._copied[slot].record()
        self._updates += 1

    def ended_before(self) -> bool:
        """Whether the phase was over as of the update before the latest one (False before two updates).
        Reads host memory that the device wrote a step ago: in practice no wait."""
        older = self._settled_slot()
        return False if older is None else bool(self._flags[older])

    def rho_before(self) -> float:
        """rho as of the update before the latest one (0 before two updates), read as `ended_before` reads its
        flag: host memory the device wrote a step ago."""
        older = self._settled_slot()
        return 0.0 if older is None else float(self._rhos[older])

    def _settled_slot(self) -> int | None:
        """The host slot the update before the latest one wrote (its copy waited for), None before two updates."""
        if self._updates < 2:
            return None
        older = self._updates % 2  # the latest update wrote the other slot
        if self._copied is not None:
            self._copied[older].synchronize()
        return older

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).clone() for name in ("fast", "slow", "rho", "done", "plateau_step")}
        return {**state, "flags": self._flags.clone(), "rhos": self._rhos.clone(), "updates": self._updates}

    def load_state_dict(self, state: dict) -> None:
        for name in ("fast", "slow", "rho", "done", "plateau_step"):
            getattr(self, name).copy_(state[name])
        self._flags.copy_(state["flags"])
        if "rhos" in state:  # a checkpoint from before the soft hand-overs has none (rho_before reads 0 for a step)
            self._rhos.copy_(state["rhos"])
        self._updates = state["updates"]
