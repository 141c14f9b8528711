"""Fused negative-cosine losses over row pairs: loss = NUM_PAIRS - sum_pairs mean_rows cos(a_i, b_i).

One pair (a, b) is RELA's 1 - cos(y_hat, y); two pairs (p1, z2), (p2, z1) are BYOL's symmetric
loss 0.5 * mean(2 - 2 cos(p1, z2)) + 0.5 * mean(2 - 2 cos(p2, z1)). Only the `a` side is
differentiated. The cosine follows torch.nn.functional.cosine_similarity: each norm is clamped to
eps, and the clamp is invisible to the gradient (torch clamps in place under no_grad), so

    cos   = a.b * r,               r = 1 / (max(|a|, eps) * max(|b|, eps))
    dcos/da = r * b - s * a,       s = cos / (max(|a|, eps) * |a|), 0 where |a| = 0

The forward kernel stores (r, s) per row and pair, so the backward kernel is one pass that never
recomputes the norms. Rows are reduced into one scalar in the same launch: every program writes its
partial sum, and the program that takes the last ticket from a counter (one per device and stream)
adds the partials in a fixed order (deterministic, no memset launch) and resets the counter for the
next launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch
from .casts import cast_rne
from .launch import TicketCounters, acc_dtype, cdiv, direct, pow2, tl_acc

# Helpers and triton.language's own jitted functions (tl.sum, tl.zeros, tl.cdiv) cost milliseconds per
# call in Triton's interpreter, where the tests run: the kernels call them once per pair and row block,
# and use tl.full and integer arithmetic elsewhere.


@triton.jit
def _pair_cosine(a_ptr, b_ptr, stride_a_row, stride_a_col, stride_b_row, stride_b_col, rows64, row_mask, D, eps,
                 BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, FP64: tl.constexpr):
    """Per row of one pair (a, b) over all D columns: (cos, r, s) of the module docstring, in ACC."""
    dot = tl.full([BLOCK_B], 0, ACC)
    aa = tl.full([BLOCK_B], 0, ACC)
    bb = tl.full([BLOCK_B], 0, ACC)
    for col_start in range(0, D, BLOCK_D):
        cols = col_start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        a = tl.load(a_ptr + rows64 * stride_a_row + cols64 * stride_a_col, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + rows64 * stride_b_row + cols64 * stride_b_col, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(a * b, axis=1)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    # sqrt_rn is IEEE sqrt but fp32 only; tl.sqrt on fp64 is exact already.
    if FP64:
        norm_a = tl.sqrt(aa)
        norm_b = tl.sqrt(bb)
    else:
        norm_a = tl.sqrt_rn(aa)
        norm_b = tl.sqrt_rn(bb)
    # torch's clamp_min keeps a NaN norm, and so a NaN row's loss and whole gradient row are NaN; tl.maximum
    # would return eps (it is IEEE maxNum unless asked to propagate NaN).
    clamped_a = tl.maximum(norm_a, eps, propagate_nan=tl.PropagateNan.ALL)
    r = 1.0 / (clamped_a * tl.maximum(norm_b, eps, propagate_nan=tl.PropagateNan.ALL))
    cos = dot * r
    s = tl.where(norm_a == 0, 0.0, cos / (clamped_a * tl.where(norm_a == 0, 1.0, norm_a)))
    return cos, r, s


@triton.jit
def _store_pair_grad(a_ptr, b_ptr, stride_a_row, stride_a_col, stride_b_row, stride_b_col, grad_ptr,
                     stats, rows64, cols64, mask, row_mask, scale, D, ACC: tl.constexpr):
    """grad_a = scale * (r * b - s * a) over one tile of a pair; `stats` points at the pair's (r, s) per row."""
    r = scale * tl.load(stats, mask=row_mask, other=0.0)
    s = scale * tl.load(stats + 1, mask=row_mask, other=0.0)
    a = tl.load(a_ptr + rows64 * stride_a_row + cols64 * stride_a_col, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + rows64 * stride_b_row + cols64 * stride_b_col, mask=mask, other=0.0).to(ACC)
    tl.store(grad_ptr + rows64 * D + cols64, cast_rne(r[:, None] * b - s[:, None] * a, grad_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def cosine_loss_fwd_kernel(
    a0_ptr, b0_ptr, a1_ptr, b1_ptr,
    stride_a0_row, stride_a0_col, stride_b0_row, stride_b0_col,
    stride_a1_row, stride_a1_col, stride_b1_row, stride_b1_col,
    stats_ptr, partial_ptr, counter_ptr, loss_ptr,
    B, D, eps_ptr,
    NUM_PAIRS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    ACC: tl.constexpr, FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    # eps is read from memory: a float argument would be rounded to float32 in the float64 kernel.
    eps = tl.load(eps_ptr)
    cos_sum = tl.full([BLOCK_B], 0, ACC)
    for row_block in range(pid, (B + BLOCK_B - 1) // BLOCK_B, num_programs):
        rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)[:, None]
        stats = stats_ptr + rows.to(tl.int64) * (2 * NUM_PAIRS)
        cos_row, r, s = _pair_cosine(a0_ptr, b0_ptr, stride_a0_row, stride_a0_col, stride_b0_row, stride_b0_col,
                                     rows64, row_mask, D, eps, BLOCK_B, BLOCK_D, ACC, FP64)
        tl.store(stats, r, mask=row_mask)
        tl.store(stats + 1, s, mask=row_mask)
        if NUM_PAIRS == 2:
            cos, r, s = _pair_cosine(a1_ptr, b1_ptr, stride_a1_row, stride_a1_col, stride_b1_row, stride_b1_col,
                                     rows64, row_mask, D, eps, BLOCK_B, BLOCK_D, ACC, FP64)
            tl.store(stats + 2, r, mask=row_mask)
            tl.store(stats + 3, s, mask=row_mask)
            cos_row += cos
        cos_sum += tl.where(row_mask, cos_row, 0.0)

    tl.store(partial_ptr + pid, tl.sum(cos_sum, axis=0))
    # Every thread's store must be ordered before the (single-thread, release) ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1)
    if ticket == num_programs - 1:
        total = tl.full([BLOCK_P], 0, ACC)
        for start in range(0, num_programs, BLOCK_P):
            offs = start + tl.arange(0, BLOCK_P)
            # .cg reads from L2: the other programs' partials may be stale in this SM's L1.
            total += tl.load(partial_ptr + offs, mask=offs < num_programs, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, NUM_PAIRS - tl.sum(total, axis=0) / B)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def cosine_loss_bwd_kernel(
    a0_ptr, b0_ptr, a1_ptr, b1_ptr,
    stride_a0_row, stride_a0_col, stride_b0_row, stride_b0_col,
    stride_a1_row, stride_a1_col, stride_b1_row, stride_b1_col,
    grad_a0_ptr, grad_a1_ptr, stats_ptr, grad_loss_ptr,
    B, D,
    NUM_PAIRS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]
    # d loss / d cos = -grad / B for every row of every pair.
    scale = -tl.load(grad_loss_ptr).to(ACC) / B
    stats = stats_ptr + rows.to(tl.int64) * (2 * NUM_PAIRS)
    _store_pair_grad(a0_ptr, b0_ptr, stride_a0_row, stride_a0_col, stride_b0_row, stride_b0_col, grad_a0_ptr,
                     stats, rows64, cols64, mask, row_mask, scale, D, ACC)
    if NUM_PAIRS == 2:
        _store_pair_grad(a1_ptr, b1_ptr, stride_a1_row, stride_a1_col, stride_b1_row, stride_b1_col,
                         grad_a1_ptr, stats + 2, rows64, cols64, mask, row_mask, scale, D, ACC)


# One ticket counter per device and stream; the last program of each launch sets it back to zero.
_tickets = TicketCounters()
_eps: dict[tuple[torch.device, torch.dtype, float], torch.Tensor] = {}


def ticket_counter(device: torch.device) -> torch.Tensor:
    """The forward kernel's ticket counter for `device` and its current stream: (1,) int32, zero between launches."""
    return _tickets.get(device)


def eps_tensor(device: torch.device, dtype: torch.dtype, eps: float) -> torch.Tensor:
    """eps as a 0-dim tensor of the accumulation dtype, made once per (device, dtype, eps)."""
    key = (device, dtype, eps)
    if key not in _eps:
        _eps[key] = torch.full((), eps, dtype=dtype, device=device)
    return _eps[key]


@functools.lru_cache(maxsize=256)
def _blocks(B: int, D: int, num_pairs: int) -> tuple[int, int, int]:
    # A tile of about 4096 elements per pair keeps the live tiles of both pairs in registers.
    block_d = min(pow2(D), 2048)
    block_b = max(1, min(pow2(B), 4096 // num_pairs // block_d))
    num_warps = 8 if block_b * block_d * num_pairs >= 8192 else 4
    return block_b, block_d, num_warps


def cosine_loss_forward(pairs: list[tuple[torch.Tensor, torch.Tensor]], eps: torch.Tensor, counter: torch.Tensor,
                        wrap=direct):
    """Launches the forward kernel over 1 or 2 pairs of (B, D) tensors (any strides, dtypes).

    eps: 0-dim tensor of the accumulation dtype (`eps_tensor`); counter: (1,) int32, zero before the
    launch and after it (`ticket_counter`, or a fresh zero). wrap: applied to the jitted kernel before
    the launch (torch.library.wrap_triton inside a custom op). Returns (loss, stats): loss a 0-dim
    float32 tensor (float64 if any input is float64), stats a (B, 2 * len(pairs)) tensor of the same
    dtype for `cosine_loss_backward`.
    """
    num_pairs = len(pairs)
    a0, b0 = pairs[0]
    a1, b1 = pairs[-1]
    # Block sizes are compile-time constants: under torch.compile with dynamic shapes int() specialises on them.
    B, D = int(a0.shape[0]), int(a0.shape[1])
    device = a0.device
    acc = acc_dtype(*(t for pair in pairs for t in pair))
    block_b, block_d, num_warps = _blocks(B, D, num_pairs)
    grid = min(cdiv(B, block_b), launch.programs_to_fill(device))
    stats = torch.empty((B, 2 * num_pairs), dtype=acc, device=device)
    partial = torch.empty(grid, dtype=acc, device=device)
    loss = torch.empty((), dtype=acc, device=device)
    wrap(cosine_loss_fwd_kernel)[(grid,)](
        a0, b0, a1, b1, *a0.stride(), *b0.stride(), *a1.stride(), *b1.stride(),
        stats, partial, counter, loss, B, D, eps,
        NUM_PAIRS=num_pairs, BLOCK_B=block_b, BLOCK_D=block_d,
        BLOCK_P=min(pow2(grid), 1024), ACC=tl_acc(acc), FP64=acc == torch.float64,
        num_warps=num_warps,
    )
    return loss, stats


def cosine_loss_backward(pairs: list[tuple[torch.Tensor, torch.Tensor]], stats: torch.Tensor,
                         grad_loss: torch.Tensor, wrap=direct) -> list[torch.Tensor]:
    """Gradients of the loss w.r.t. each pair's `a`: contiguous (B, D) tensors in a's dtype.

    `grad_loss` is the 0-dim upstream gradient, read on the device (no host sync). wrap: as for
    `cosine_loss_forward`.
    """
    num_pairs = len(pairs)
    a0, b0 = pairs[0]
    a1, b1 = pairs[-1]
    B, D = int(a0.shape[0]), int(a0.shape[1])
    grads = [torch.empty((B, D), dtype=a.dtype, device=a.device) for a, _ in pairs]
    block_b, block_d, num_warps = _blocks(B, D, num_pairs)
    grid = (cdiv(B, block_b), cdiv(D, block_d))
    wrap(cosine_loss_bwd_kernel)[grid](
        a0, b0, a1, b1, *a0.stride(), *b0.stride(), *a1.stride(), *b1.stride(),
        grads[0], grads[-1], stats, grad_loss, B, D,
        NUM_PAIRS=num_pairs, BLOCK_B=block_b, BLOCK_D=block_d,
        ACC=tl_acc(stats.dtype),
        num_warps=num_warps,
    )
    return grads
