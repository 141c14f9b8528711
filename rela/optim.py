"""Optimisers (AdamW, LARS) and the per-step learning rate: linear warm-up, then cosine decay."""
from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as BYOL trains ImageNet.

    Groups with `lars_exclude=True` (biases, norm layers) get neither weight decay nor adaptation.
    A step is a handful of `torch._foreach_*` launches per group, whatever the number of parameters, each
    on CUDA's multi-tensor fast path (one list of one dtype and device, the lists' tensors of equal shapes);
    the trust ratios stay on the device (no host sync).
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = self._momentum_buffers(params)
            torch._foreach_mul_(buffers, group["momentum"])
            if group["lars_exclude"]:
                torch._foreach_add_(buffers, grads)
            else:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((param_norms > 0) & (grad_norms > 0),
                                    group["trust_coefficient"] * param_norms / grad_norms,
                                    torch.ones_like(param_norms))
                # v <- m v + trust * g in one op. The trust ratios go in as a list of 0-d tensors: addcmul
                # reads each from the device on CUDA's fast path (torch >= 2.11), where _foreach_mul_ with
                # that list takes the slow path (the lists' shapes differ: one launch per parameter).
                torch._foreach_addcmul_(buffers, trust.unbind(), grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss

    def _momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's momentum buffer, made as zeros before its first step: m * 0 + g is then g
        exactly, SGD's first step, with no list of new and old parameters to split the step by."""
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        return buffers


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
    # The fused kernel (one launch per step) needs every parameter on CUDA; foreach elsewhere.
    on_cuda = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, fused=on_cuda or None, foreach=None if on_cuda else True)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
