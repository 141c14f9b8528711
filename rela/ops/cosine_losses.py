"""BYOL's and RELA's negative-cosine losses: references, autograd Functions over the fused kernels, dispatch.

Both losses are NUM_PAIRS - sum over pairs of mean_i cos(a_i, b_i) for row pairs (a, b) where only
`a` is differentiated. BYOL: pairs (p1, z2), (p2, z1); RELA: one pair (y_hat, y). The cosine is
torch.nn.functional.cosine_similarity's with eps=1e-8, gradients included (each norm is clamped to
eps, and the clamp does not enter the gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rela.ops._dispatch import use_kernels

try:
    from rela.kernels.cosine_loss import cosine_loss_backward, cosine_loss_forward
except ImportError:  # no Triton: use_kernels() then never picks the Functions below
    cosine_loss_forward = cosine_loss_backward = None

EPS = 1e-8  # torch.nn.functional.cosine_similarity's default; the kernels take it as an argument


def _check_rows(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    shape, device = tensors[0].shape, tensors[0].device
    if (len(shape) == 2 and shape[0] and shape[1]
            and all(t.shape == shape and t.device == device and t.is_floating_point() for t in tensors)):
        return
    for name, t in zip(names, tensors):
        if t.dim() != 2 or t.shape != shape or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{', '.join(names)} must share one (B, D) shape with B, D >= 1; "
                             f"got {name} of shape {tuple(t.shape)} (first: {tuple(shape)})")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like {names[0]}")


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _neg_cos_mean(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return (1 - F.cosine_similarity(a.to(acc), b.detach().to(acc), dim=-1, eps=EPS)).mean()


def byol_loss_reference(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """0.5 * mean(2 - 2 cos(p1, z2)) + 0.5 * mean(2 - 2 cos(p2, z1)) in plain torch (the definition).

    p1, p2, z1, z2: (B, D) float32|bf16|fp16|float64. Computed in float32 (float64 if any input is).
    Differentiated w.r.t. p1 and p2 only: z1, z2 are detached. Returns a 0-dim float32 (float64) tensor.
    """
    acc = _acc(p1, p2, z1, z2)
    return _neg_cos_mean(p1, z2, acc) + _neg_cos_mean(p2, z1, acc)


def rela_loss_reference(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean over rows of 1 - cos(y_hat, y) in plain torch (the definition).

    y_hat, y: (B, D) float32|bf16|fp16|float64; computed in float32 (float64 if either input is).
    Differentiated w.r.t. y_hat only: y (the static target) is detached. Returns a 0-dim tensor.
    """
    return _neg_cos_mean(y_hat, y, _acc(y_hat, y))


class ByolLossFunction(torch.autograd.Function):
    """Fused BYOL loss: one forward kernel, one backward kernel. Gradients for p1, p2; None for z1, z2."""

    @staticmethod
    def forward(ctx, p1, p2, z1, z2):
        pairs = [(p1, z2), (p2, z1)]
        loss, stats = cosine_loss_forward(pairs, EPS)
        ctx.save_for_backward(p1, p2, z1, z2, stats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        p1, p2, z1, z2, stats = ctx.saved_tensors
        grad_p1, grad_p2 = cosine_loss_backward([(p1, z2), (p2, z1)], stats, grad_loss)
        return grad_p1, grad_p2, None, None


class RelaLossFunction(torch.autograd.Function):
    """Fused RELA loss: one forward kernel, one backward kernel. Gradient for y_hat; None for y."""

    @staticmethod
    def forward(ctx, y_hat, y):
        loss, stats = cosine_loss_forward([(y_hat, y)], EPS)
        ctx.save_for_backward(y_hat, y, stats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        y_hat, y, stats = ctx.saved_tensors
        (grad_y_hat,) = cosine_loss_backward([(y_hat, y)], stats, grad_loss)
        return grad_y_hat, None


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
              fused: bool | None = None) -> torch.Tensor:
    """BYOL's symmetric loss 0.5 * mean(2 - 2 cos(p1, z2)) + 0.5 * mean(2 - 2 cos(p2, z1)).

    p1, p2: (B, D) predictions of views 1 and 2, differentiated. z1, z2: (B, D) target projections,
    never differentiated (as if detached). Any strides; float32|bf16|fp16 (float64 too), mixed
    dtypes allowed, accumulated in float32. Returns a 0-dim float32 tensor (float64 for float64
    inputs); the gradients have the dtypes of p1, p2.
    fused: None runs the Triton kernels for CUDA tensors and the reference for CPU tensors; False
    forces `byol_loss_reference`; True demands the kernels (see rela.ops._dispatch).
    """
    _check_rows(("p1", "p2", "z1", "z2"), (p1, p2, z1, z2))
    if use_kernels(fused, p1.device):
        return ByolLossFunction.apply(p1, p2, z1, z2)
    return byol_loss_reference(p1, p2, z1, z2)


def rela_loss(y_hat: torch.Tensor, y: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """RELA's loss against static targets: mean over rows of 1 - cos(y_hat, y).

    y_hat: (B, D), differentiated. y: (B, D) targets, never differentiated. Any strides;
    float32|bf16|fp16 (float64 too), accumulated in float32. Returns a 0-dim float32 tensor (float64
    for float64 inputs); the gradient has y_hat's dtype. fused: as for `byol_loss`.
    """
    _check_rows(("y_hat", "y"), (y_hat, y))
    if use_kernels(fused, y_hat.device):
        return RelaLossFunction.apply(y_hat, y)
    return rela_loss_reference(y_hat, y)
