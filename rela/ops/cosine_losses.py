"""BYOL's and RELA's negative-cosine losses: references, the fused kernels as torch custom ops, dispatch.

Both losses are NUM_PAIRS - sum over pairs of mean_i cos(a_i, b_i) for row pairs (a, b) where only
`a` is differentiated. BYOL: pairs (p1, z2), (p2, z1); RELA: one pair (y_hat, y). The cosine is
torch.nn.functional.cosine_similarity's with eps=1e-8, gradients included (each norm is clamped to
eps, and the clamp does not enter the gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from rela.ops._dispatch import HAVE_TRITON, INTERPRETED, use_kernels

if HAVE_TRITON:
    from rela.kernels.cosine_loss import cosine_loss_backward, cosine_loss_forward, eps_tensor, ticket_counter
else:  # use_kernels() then never picks the ops below
    cosine_loss_forward = cosine_loss_backward = eps_tensor = ticket_counter = None

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


# The kernels as torch custom ops (torch.library.triton_op): torch.compile traces through them into the
# kernels (no graph break), and each op's function doubles as its fake (meta) implementation. Under
# Triton's interpreter wrap_triton hands back the plain interpreted kernel, so the kernels are launched as
# they are there (and the fake implementations cannot run: they would launch the interpreter on fake tensors).
_wrap = (lambda kernel: kernel) if INTERPRETED else wrap_triton


# The ticket counter is written by the forward kernel but left as it was found (zero): to torch the ops are
# functional, which register_autograd requires.
@triton_op("rela::byol_loss_fwd", mutates_args=())
def _byol_loss_fwd(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, counter: torch.Tensor,
                   eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats): stats (B, 4) per-row (r, s) of both pairs for the backward. counter: (1,) int32, zero."""
    return tuple(cosine_loss_forward([(p1, z2), (p2, z1)], eps, counter, _wrap))


@triton_op("rela::byol_loss_bwd", mutates_args=())
def _byol_loss_bwd(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, stats: torch.Tensor,
                   grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(cosine_loss_backward([(p1, z2), (p2, z1)], stats, grad_loss, _wrap))


@triton_op("rela::rela_loss_fwd", mutates_args=())
def _rela_loss_fwd(y_hat: torch.Tensor, y: torch.Tensor, counter: torch.Tensor,
                   eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats): stats (B, 2) per-row (r, s) for the backward. counter: (1,) int32, zero."""
    return tuple(cosine_loss_forward([(y_hat, y)], eps, counter, _wrap))


@triton_op("rela::rela_loss_bwd", mutates_args=())
def _rela_loss_bwd(y_hat: torch.Tensor, y: torch.Tensor, stats: torch.Tensor,
                   grad_loss: torch.Tensor) -> torch.Tensor:
    return cosine_loss_backward([(y_hat, y)], stats, grad_loss, _wrap)[0]


def _save_inputs_and_stats(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-2], output[1])


def _byol_backward(ctx, grad_loss, grad_stats):
    p1, p2, z1, z2, stats = ctx.saved_tensors
    grad_p1, grad_p2 = torch.ops.rela.byol_loss_bwd(p1, p2, z1, z2, stats, grad_loss)
    return grad_p1, grad_p2, None, None, None, None


def _rela_backward(ctx, grad_loss, grad_stats):
    y_hat, y, stats = ctx.saved_tensors
    return torch.ops.rela.rela_loss_bwd(y_hat, y, stats, grad_loss), None, None, None


_byol_loss_fwd.register_autograd(_byol_backward, setup_context=_save_inputs_and_stats)
_rela_loss_fwd.register_autograd(_rela_backward, setup_context=_save_inputs_and_stats)


def _counter_and_eps(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device, acc = tensors[0].device, _acc(*tensors)
    if torch.compiler.is_compiling():
        # Fresh tensors in the traced graph (the compiler folds them in); eager runs reuse cached
        # ones and so launch no memset per call.
        return torch.zeros(1, dtype=torch.int32, device=device), torch.full((), EPS, dtype=acc, device=device)
    return ticket_counter(device), eps_tensor(device, acc, EPS)


def byol_loss_fused(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """`byol_loss` on the kernels (the custom ops rela::byol_loss_fwd/_bwd), no checks: gradients for p1, p2."""
    return torch.ops.rela.byol_loss_fwd(p1, p2, z1, z2, *_counter_and_eps(p1, p2, z1, z2))[0]


def rela_loss_fused(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`rela_loss` on the kernels (the custom ops rela::rela_loss_fwd/_bwd), no checks: gradient for y_hat."""
    return torch.ops.rela.rela_loss_fwd(y_hat, y, *_counter_and_eps(y_hat, y))[0]


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
        return byol_loss_fused(p1, p2, z1, z2)
    return byol_loss_reference(p1, p2, z1, z2)


def rela_loss(y_hat: torch.Tensor, y: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """RELA's loss against static targets: mean over rows of 1 - cos(y_hat, y).

    y_hat: (B, D), differentiated. y: (B, D) targets, never differentiated. Any strides;
    float32|bf16|fp16 (float64 too), accumulated in float32. Returns a 0-dim float32 tensor (float64
    for float64 inputs); the gradient has y_hat's dtype. fused: as for `byol_loss`.
    """
    _check_rows(("y_hat", "y"), (y_hat, y))
    if use_kernels(fused, y_hat.device):
        return rela_loss_fused(y_hat, y)
    return rela_loss_reference(y_hat, y)
