"""DINO's loss over two global crops: the reference, the fused kernels as torch custom ops, dispatch.

DINO (Caron et al. 2021, eq. 1 without multi-crop): the teacher's logits, centred and sharpened, give
targets q_a = softmax((t_a - center) / teacher_temp); each is matched to the student's other view,
log p_b = log_softmax(s_b / student_temp):

    loss = 0.5 * (mean_rows sum_k -q_1 log p_2 + mean_rows sum_k -q_2 log p_1)

Only the students s1, s2 are differentiated. The op also returns this rank's batch mean of the teacher
logits, (t1.sum(0) + t2.sum(0)) / (2B), for the caller's centre update (all-reduce it across ranks, then
center = m * center + (1 - m) * mean): the fused forward computes it in the same pass over t1, t2.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from rela.ops._dispatch import HAVE_TRITON, INTERPRETED, use_kernels

if HAVE_TRITON:
    from rela.kernels.dino_loss import dino_loss_backward, dino_loss_forward, num_tickets, ticket_counters
else:  # use_kernels() then never picks the ops below
    dino_loss_backward = dino_loss_forward = num_tickets = ticket_counters = None


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(s1, s2, t1, t2, center, student_temp, teacher_temp) -> None:
    names, tensors = ("s1", "s2", "t1", "t2"), (s1, s2, t1, t2)
    shape, device = s1.shape, s1.device
    for name, t in zip(names, tensors):
        if t.dim() != 2 or t.shape != shape or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"dino_loss: s1, s2, t1, t2 must share one (B, K) shape with B, K >= 1; "
                             f"got {name} of shape {tuple(t.shape)} (s1: {tuple(shape)})")
    K = shape[1]
    if center.shape not in ((K,), (1, K)):
        raise ValueError(f"dino_loss: center must have shape ({K},) or (1, {K}); got {tuple(center.shape)}")
    for name, t in zip(names + ("center",), tensors + (center,)):
        if not t.is_floating_point():
            raise ValueError(f"dino_loss: {name} must be floating point, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"dino_loss: {name} is on {t.device}, expected {device} like s1")
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(temp, torch.Tensor) or not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp > 0):
            raise ValueError(f"dino_loss: {name} must be a positive finite float, got {temp!r}")


def dino_loss_reference(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's two-crop loss and the teacher's batch mean in plain torch (the definition).

    s1, s2, t1, t2: (B, K) float32|bf16|fp16|float64; center: (K,) or (1, K). Computed in float32
    (float64 if any input is). Differentiated w.r.t. s1 and s2 only: t1, t2 and center are detached.
    Returns (loss 0-dim, teacher_mean (K,)) in that dtype.
    """
    acc = _acc(s1, s2, t1, t2, center)
    c = center.detach().to(acc).reshape(1, -1)
    t1, t2 = t1.detach().to(acc), t2.detach().to(acc)
    q1, q2 = (F.softmax((t - c) / teacher_temp, dim=-1) for t in (t1, t2))
    log_p1, log_p2 = (F.log_softmax(s.to(acc) / student_temp, dim=-1) for s in (s1, s2))
    loss = 0.5 * (-(q1 * log_p2).sum(-1).mean() - (q2 * log_p1).sum(-1).mean())
    teacher_mean = (t1.sum(0) + t2.sum(0)) / (2 * t1.shape[0])
    return loss, teacher_mean


# As in cosine_losses.py: the kernels as torch custom ops, so torch.compile traces into them; under Triton's
# interpreter wrap_triton would hand back the interpreted kernel anyway.
_wrap = (lambda kernel: kernel) if INTERPRETED else wrap_triton


# The ticket counters are written by the forward kernel but left as found (zeros): to torch the op is functional.
@triton_op("rela::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, center: torch.Tensor,
                   temps: torch.Tensor, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, teacher_mean, lse): lse (B, 4) per-row log-sum-exps for the backward. center: (K,);
    temps: (2,) reciprocal temperatures; counters: int32 zeros (`num_tickets`)."""
    return tuple(dino_loss_forward(s1, s2, t1, t2, center, temps, counters, _wrap))


@triton_op("rela::dino_loss_bwd", mutates_args=())
def _dino_loss_bwd(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, center: torch.Tensor,
                   temps: torch.Tensor, lse: torch.Tensor,
                   grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_s1, grad_s2) in the students' dtypes; lse: the forward's; grad_loss: 0-dim upstream gradient."""
    return tuple(dino_loss_backward(s1, s2, t1, t2, center, temps, lse, grad_loss, _wrap))


def _setup_context(ctx, inputs, output):
    s1, s2, t1, t2, center, temps, _ = inputs
    ctx.save_for_backward(s1, s2, t1, t2, center, temps, output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_loss, grad_mean, grad_lse):
    s1, s2, t1, t2, center, temps, lse = ctx.saved_tensors
    grad_s1, grad_s2 = torch.ops.rela.dino_loss_bwd(s1, s2, t1, t2, center, temps, lse, grad_loss)
    return grad_s1, grad_s2, None, None, None, None, None


_dino_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _temps_tensor(device: torch.device, dtype: torch.dtype, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """[1 / student_temp, 1 / teacher_temp] on the device: two fills, no host-to-device copy (one from
    pageable memory would synchronise)."""
    temps = torch.full((2,), 1.0 / student_temp, dtype=dtype, device=device)
    temps[1:].fill_(1.0 / teacher_temp)
    return temps


# DINO's teacher temperature follows a warm-up: a few values per run.
_cached_temps_tensor = functools.lru_cache(maxsize=64)(_temps_tensor)


def dino_loss_fused(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, center: torch.Tensor,
                    student_temp: float, teacher_temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`dino_loss` on the kernels (the custom ops rela::dino_loss_fwd/_bwd), no checks: gradients for s1, s2."""
    device, acc = s1.device, _acc(s1, s2, t1, t2, center)
    B, K = s1.shape
    if torch.compiler.is_compiling():  # fresh tensors in the traced graph; eager calls reuse cached ones
        temps = _temps_tensor(device, acc, student_temp, teacher_temp)
        counters = torch.zeros(num_tickets(int(B), int(K), device), dtype=torch.int32, device=device)
    else:
        temps = _cached_temps_tensor(device, acc, float(student_temp), float(teacher_temp))
        counters = ticket_counters(B, K, device)
    loss, teacher_mean, _ = torch.ops.rela.dino_loss_fwd(s1, s2, t1.detach(), t2.detach(), center.detach().reshape(-1),
                                                         temps, counters)
    return loss, teacher_mean


def dino_loss(s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float, *, fused: bool | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's two-crop loss 0.5 * (CE(q_1, p_2) + CE(q_2, p_1)) and the teacher's batch mean.

    s1, s2: (B, K) student logits of views 1 and 2, differentiated. t1, t2: (B, K) teacher logits and
    center: (K,) or (1, K), never differentiated (detached inside; center is not modified).
    q_a = softmax((t_a - center) / teacher_temp), log p_b = log_softmax(s_b / student_temp). Any strides;
    float32|bf16|fp16 (float64 too), mixed dtypes allowed, computed in float32 (float64 if any input is).
    Returns (loss, teacher_mean): a 0-dim tensor and (t1.sum(0) + t2.sum(0)) / (2B) of shape (K,), float32
    (float64); teacher_mean is this rank's, for the caller to all-reduce before the centre update. The
    gradients have the dtypes of s1, s2.
    fused: None runs the Triton kernels for CUDA tensors and the reference for CPU tensors; False
    forces `dino_loss_reference`; True demands the kernels (see rela.ops._dispatch).
    """
    _check(s1, s2, t1, t2, center, student_temp, teacher_temp)
    if use_kernels(fused, s1.device):
        return dino_loss_fused(s1, s2, t1, t2, center, student_temp, teacher_temp)
    return dino_loss_reference(s1, s2, t1, t2, center, student_temp, teacher_temp)
