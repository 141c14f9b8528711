"""Fused DINO loss (two global crops): centred, sharpened teacher softmax against student log-softmax.

With z_b = s_b / student_temp, u_a = (t_a - center) / teacher_temp and q_a = softmax(u_a):

    loss = 0.5 * (mean_rows CE(q_1, z_2) + mean_rows CE(q_2, z_1)),
    CE(q_a, z_b) = -sum_k q_a log softmax(z_b) = lse(z_b) - sum_k q_a z_b     (sum_k q_a = 1)
    teacher_mean = (t_1.sum(0) + t_2.sum(0)) / (2B)
    d loss / d s_b = 0.5 / B / student_temp * (softmax(z_b) - q_a)             (crossed pairs)

Forward: one launch on a (row blocks, column chunks) grid reads s1, s2, t1, t2 once. Each program streams
its BLOCK_B x CHUNK_K window in BLOCK_K steps and keeps, per row, an online softmax of each input:
the running max and sum of exp for z_1, z_2, u_1, u_2, and for each teacher the exp-weighted sum of the
crossed student's z (sum_k exp(u_a - max) z_b, rescaled like the sum), so sum_k q_a z_b never needs a
second pass. It also sums t_1 + t_2 over its rows per column. Three levels of "last ticket" reduce
what the programs wrote, each in a fixed order (deterministic, no float atomics, no extra launch):
- per column chunk, the last of its row blocks adds the row blocks' column sums (a tile of row blocks at a
  time) -> teacher_mean;
- per row block, the last of its column chunks merges the chunks' softmax statistics, stores each row's
  four log-sum-exps (lse of z_1, z_2, u_1, u_2) for the backward and adds the rows' losses;
- the last row block to finish adds the row blocks' losses -> loss.
Each counter is set back to zero by its last taker, so the counters are zero between launches. Beyond the
inputs, the forward writes and reads back one float row of column sums per row block (B / 16 x K on CUDA,
1/16 of a float32 input; in L2 at DINO's sizes) and 10 floats per row and column chunk.

Backward: one pass over (row, column) tiles reads s1, s2, t1, t2 and the four log-sum-exps per row and
writes both gradients: softmax(z_b) = exp(z_b - lse(z_b)), q_a = exp(u_a - lse(u_a)).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import launch
from .casts import cast_rne
from .launch import TicketCounters, acc_dtype, cdiv, direct, pow2, tl_acc

# Interpreter note (see cosine_loss.py): triton.language's jitted helpers cost milliseconds per call in
# Triton's interpreter, where the tests run, so the kernels spell the online softmax out inline.

NUM_STATS = 10  # per (row, column chunk): max and sum of z_1, z_2; max, sum, weighted sum of u_1, u_2


@triton.jit
def dino_loss_fwd_kernel(
    s1_ptr, s2_ptr, t1_ptr, t2_ptr, center_ptr,
    stride_s1_row, stride_s1_col, stride_s2_row, stride_s2_col,
    stride_t1_row, stride_t1_col, stride_t2_row, stride_t2_col, stride_c,
    temps_ptr, partial_cols_ptr, partial_stats_ptr, partial_loss_ptr, counter_ptr,
    lse_ptr, teacher_mean_ptr, loss_ptr,
    B, K, CHUNK_K,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    row_block = tl.program_id(0)
    chunk = tl.program_id(1)
    num_row_blocks = tl.num_programs(0)
    num_chunks = tl.num_programs(1)
    # Reciprocal temperatures, read from memory: float arguments would be rounded to float32 in the
    # float64 kernel.
    inv_ts = tl.load(temps_ptr)
    inv_tt = tl.load(temps_ptr + 1)

    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)[:, None]

    m1 = tl.full([BLOCK_B], float("-inf"), ACC)  # student z_1: running max and sum of exp(z_1 - m1)
    l1 = tl.full([BLOCK_B], 0, ACC)
    m2 = tl.full([BLOCK_B], float("-inf"), ACC)
    l2 = tl.full([BLOCK_B], 0, ACC)
    n1 = tl.full([BLOCK_B], float("-inf"), ACC)  # teacher u_1: max, sum of exp(u_1 - n1), and of exp(..) * z_2
    L1 = tl.full([BLOCK_B], 0, ACC)
    w1 = tl.full([BLOCK_B], 0, ACC)
    n2 = tl.full([BLOCK_B], float("-inf"), ACC)
    L2 = tl.full([BLOCK_B], 0, ACC)
    w2 = tl.full([BLOCK_B], 0, ACC)

    col_start = chunk * CHUNK_K
    col_end = tl.minimum(col_start + CHUNK_K, K)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < col_end
        mask = row_mask[:, None] & col_mask[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        c = tl.load(center_ptr + cols.to(tl.int64) * stride_c, mask=col_mask, other=0.0).to(ACC)
        t1 = tl.load(t1_ptr + rows64 * stride_t1_row + cols64 * stride_t1_col, mask=mask, other=0.0).to(ACC)
        t2 = tl.load(t2_ptr + rows64 * stride_t2_row + cols64 * stride_t2_col, mask=mask, other=0.0).to(ACC)
        z1 = tl.load(s1_ptr + rows64 * stride_s1_row + cols64 * stride_s1_col, mask=mask, other=0.0).to(ACC) * inv_ts
        z2 = tl.load(s2_ptr + rows64 * stride_s2_row + cols64 * stride_s2_col, mask=mask, other=0.0).to(ACC) * inv_ts
        u1 = (t1 - c[None, :]) * inv_tt
        u2 = (t2 - c[None, :]) * inv_tt
        # Columns past the end weigh nothing (exp(-inf) = 0); rows past B hold zeros and are never stored.
        # Every chunk's first step has a valid column, so the running maxima are finite after it.
        outside = (cols >= col_end)[None, :]

        z1_max = tl.where(outside, float("-inf"), z1)
        new_m1 = tl.maximum(m1, tl.max(z1_max, axis=1))
        l1 = l1 * tl.exp(m1 - new_m1) + tl.sum(tl.exp(z1_max - new_m1[:, None]), axis=1)
        m1 = new_m1

        z2_max = tl.where(outside, float("-inf"), z2)
        new_m2 = tl.maximum(m2, tl.max(z2_max, axis=1))
        l2 = l2 * tl.exp(m2 - new_m2) + tl.sum(tl.exp(z2_max - new_m2[:, None]), axis=1)
        m2 = new_m2

        u1_max = tl.where(outside, float("-inf"), u1)
        new_n1 = tl.maximum(n1, tl.max(u1_max, axis=1))
        e1 = tl.exp(u1_max - new_n1[:, None])
        scale1 = tl.exp(n1 - new_n1)
        L1 = L1 * scale1 + tl.sum(e1, axis=1)
        w1 = w1 * scale1 + tl.sum(e1 * z2, axis=1)
        n1 = new_n1

        u2_max = tl.where(outside, float("-inf"), u2)
        new_n2 = tl.maximum(n2, tl.max(u2_max, axis=1))
        e2 = tl.exp(u2_max - new_n2[:, None])
        scale2 = tl.exp(n2 - new_n2)
        L2 = L2 * scale2 + tl.sum(e2, axis=1)
        w2 = w2 * scale2 + tl.sum(e2 * z1, axis=1)
        n2 = new_n2

        # This row block's column sums of the teacher (rows past B loaded as zeros).
        tl.store(partial_cols_ptr + row_block.to(tl.int64) * K + cols, tl.sum(t1 + t2, axis=0), mask=col_mask)

    # partial_stats: (num_chunks, NUM_STATS, B)
    stats = partial_stats_ptr + chunk.to(tl.int64) * 10 * B + rows
    tl.store(stats, m1, mask=row_mask)
    tl.store(stats + B, l1, mask=row_mask)
    tl.store(stats + 2 * B, m2, mask=row_mask)
    tl.store(stats + 3 * B, l2, mask=row_mask)
    tl.store(stats + 4 * B, n1, mask=row_mask)
    tl.store(stats + 5 * B, L1, mask=row_mask)
    tl.store(stats + 6 * B, w1, mask=row_mask)
    tl.store(stats + 7 * B, n2, mask=row_mask)
    tl.store(stats + 8 * B, L2, mask=row_mask)
    tl.store(stats + 9 * B, w2, mask=row_mask)
    # Every thread's stores must be ordered before the (single-thread, release) tickets.
    tl.debug_barrier()

    # counters: [0, num_chunks) per column chunk, [num_chunks, num_chunks + num_row_blocks) per row block,
    # then one for the loss.
    col_ticket = tl.atomic_add(counter_ptr + chunk, 1)
    if col_ticket == num_row_blocks - 1:
        for k0 in range(col_start, col_end, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < col_end
            total = tl.full([BLOCK_K], 0, ACC)
            # BLOCK_R row blocks' column sums per step: one wide load in flight, not one per row block.
            for r0 in range(0, num_row_blocks, BLOCK_R):
                blocks = r0 + tl.arange(0, BLOCK_R)
                tile_mask = (blocks < num_row_blocks)[:, None] & col_mask[None, :]
                # .cg reads from L2: the other programs' partials may be stale in this SM's L1.
                tile = tl.load(partial_cols_ptr + blocks.to(tl.int64)[:, None] * K + cols[None, :], mask=tile_mask,
                               other=0.0, cache_modifier=".cg")
                total += tl.sum(tile, axis=0)
            tl.store(teacher_mean_ptr + cols, total / (2 * B), mask=col_mask)
        tl.atomic_xchg(counter_ptr + chunk, 0)

    row_ticket = tl.atomic_add(counter_ptr + num_chunks + row_block, 1)
    if row_ticket == num_chunks - 1:
        m1 = tl.full([BLOCK_B], float("-inf"), ACC)
        l1 = tl.full([BLOCK_B], 0, ACC)
        m2 = tl.full([BLOCK_B], float("-inf"), ACC)
        l2 = tl.full([BLOCK_B], 0, ACC)
        n1 = tl.full([BLOCK_B], float("-inf"), ACC)
        L1 = tl.full([BLOCK_B], 0, ACC)
        w1 = tl.full([BLOCK_B], 0, ACC)
        n2 = tl.full([BLOCK_B], float("-inf"), ACC)
        L2 = tl.full([BLOCK_B], 0, ACC)
        w2 = tl.full([BLOCK_B], 0, ACC)
        for j in range(0, num_chunks):
            # Rows past B read maxima 0 and sums 1 (no log(0)); their results are never stored.
            s = partial_stats_ptr + j * 10 * B + rows
            cm1 = tl.load(s, mask=row_mask, other=0.0, cache_modifier=".cg")
            cl1 = tl.load(s + B, mask=row_mask, other=1.0, cache_modifier=".cg")
            cm2 = tl.load(s + 2 * B, mask=row_mask, other=0.0, cache_modifier=".cg")
            cl2 = tl.load(s + 3 * B, mask=row_mask, other=1.0, cache_modifier=".cg")
            cn1 = tl.load(s + 4 * B, mask=row_mask, other=0.0, cache_modifier=".cg")
            cL1 = tl.load(s + 5 * B, mask=row_mask, other=1.0, cache_modifier=".cg")
            cw1 = tl.load(s + 6 * B, mask=row_mask, other=0.0, cache_modifier=".cg")
            cn2 = tl.load(s + 7 * B, mask=row_mask, other=0.0, cache_modifier=".cg")
            cL2 = tl.load(s + 8 * B, mask=row_mask, other=1.0, cache_modifier=".cg")
            cw2 = tl.load(s + 9 * B, mask=row_mask, other=0.0, cache_modifier=".cg")
            new = tl.maximum(m1, cm1)
            l1 = l1 * tl.exp(m1 - new) + cl1 * tl.exp(cm1 - new)
            m1 = new
            new = tl.maximum(m2, cm2)
            l2 = l2 * tl.exp(m2 - new) + cl2 * tl.exp(cm2 - new)
            m2 = new
            new = tl.maximum(n1, cn1)
            old_scale = tl.exp(n1 - new)
            chunk_scale = tl.exp(cn1 - new)
            L1 = L1 * old_scale + cL1 * chunk_scale
            w1 = w1 * old_scale + cw1 * chunk_scale
            n1 = new
            new = tl.maximum(n2, cn2)
            old_scale = tl.exp(n2 - new)
            chunk_scale = tl.exp(cn2 - new)
            L2 = L2 * old_scale + cL2 * chunk_scale
            w2 = w2 * old_scale + cw2 * chunk_scale
            n2 = new
        lse_z1 = m1 + tl.log(l1)
        lse_z2 = m2 + tl.log(l2)
        lse = lse_ptr + rows.to(tl.int64) * 4
        tl.store(lse, lse_z1, mask=row_mask)
        tl.store(lse + 1, lse_z2, mask=row_mask)
        tl.store(lse + 2, n1 + tl.log(L1), mask=row_mask)
        tl.store(lse + 3, n2 + tl.log(L2), mask=row_mask)
        # CE(q_1, z_2) + CE(q_2, z_1) per row; the 0.5 and 1/B are applied once, to the total.
        row_loss = (lse_z2 - w1 / L1) + (lse_z1 - w2 / L2)
        tl.store(partial_loss_ptr + row_block, tl.sum(tl.where(row_mask, row_loss, 0.0), axis=0))
        tl.atomic_xchg(counter_ptr + num_chunks + row_block, 0)
        tl.debug_barrier()
        loss_ticket = tl.atomic_add(counter_ptr + num_chunks + num_row_blocks, 1)
        if loss_ticket == num_row_blocks - 1:
            total = tl.full([BLOCK_P], 0, ACC)
            for start in range(0, num_row_blocks, BLOCK_P):
                offs = start + tl.arange(0, BLOCK_P)
                total += tl.load(partial_loss_ptr + offs, mask=offs < num_row_blocks, other=0.0,
                                 cache_modifier=".cg")
            tl.store(loss_ptr, tl.sum(total, axis=0) * 0.5 / B)
            tl.atomic_xchg(counter_ptr + num_chunks + num_row_blocks, 0)


@triton.jit
def dino_loss_bwd_kernel(
    s1_ptr, s2_ptr, t1_ptr, t2_ptr, center_ptr,
    stride_s1_row, stride_s1_col, stride_s2_row, stride_s2_col,
    stride_t1_row, stride_t1_col, stride_t2_row, stride_t2_col, stride_c,
    temps_ptr, lse_ptr, grad_loss_ptr, grad_s1_ptr, grad_s2_ptr,
    B, K,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < B
    col_mask = cols < K
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    cols64 = cols.to(tl.int64)[None, :]
    inv_ts = tl.load(temps_ptr)
    inv_tt = tl.load(temps_ptr + 1)
    scale = tl.load(grad_loss_ptr).to(ACC) * 0.5 / B * inv_ts
    lse = lse_ptr + rows.to(tl.int64) * 4
    # Lanes outside (B, K) are never stored; they still compute exp(-inf) = 0, not an overflow: rows past B
    # read log-sum-exps of +inf, columns past K students of -inf and a center of +inf.
    lse_z1 = tl.load(lse, mask=row_mask, other=float("inf"))[:, None]
    lse_z2 = tl.load(lse + 1, mask=row_mask, other=float("inf"))[:, None]
    lse_u1 = tl.load(lse + 2, mask=row_mask, other=float("inf"))[:, None]
    lse_u2 = tl.load(lse + 3, mask=row_mask, other=float("inf"))[:, None]
    c = tl.load(center_ptr + cols.to(tl.int64) * stride_c, mask=col_mask, other=float("inf")).to(ACC)[None, :]
    z1 = tl.load(s1_ptr + rows64 * stride_s1_row + cols64 * stride_s1_col, mask=mask,
                 other=float("-inf")).to(ACC) * inv_ts
    z2 = tl.load(s2_ptr + rows64 * stride_s2_row + cols64 * stride_s2_col, mask=mask,
                 other=float("-inf")).to(ACC) * inv_ts
    t1 = tl.load(t1_ptr + rows64 * stride_t1_row + cols64 * stride_t1_col, mask=mask, other=0.0).to(ACC)
    t2 = tl.load(t2_ptr + rows64 * stride_t2_row + cols64 * stride_t2_col, mask=mask, other=0.0).to(ACC)
    q1 = tl.exp((t1 - c) * inv_tt - lse_u1)
    q2 = tl.exp((t2 - c) * inv_tt - lse_u2)
    grad_s1 = scale * (tl.exp(z1 - lse_z1) - q2)
    grad_s2 = scale * (tl.exp(z2 - lse_z2) - q1)
    tl.store(grad_s1_ptr + rows64 * K + cols64, cast_rne(grad_s1, grad_s1_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_s2_ptr + rows64 * K + cols64, cast_rne(grad_s2, grad_s2_ptr.dtype.element_ty), mask=mask)


# The forward's ticket counters (launch.TicketCounters), 1,024 or more per buffer.
_tickets = TicketCounters(minimum=1024)


def _launch_shape(device: torch.device) -> tuple[int, int]:
    """(programs to aim for, elements per input tile) on `device`: wide tiles in the interpreter, where each
    operation costs about the same however wide."""
    return launch.programs_to_fill(device), (2048 if device.type == "cuda" else 8192)


@functools.lru_cache(maxsize=256)
def _fwd_blocks(B: int, K: int, target_programs: int, tile: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_B, BLOCK_K, CHUNK_K, row blocks, column chunks, BLOCK_R) of the forward.

    BLOCK_R: how many row blocks' column sums the last program of a column chunk adds per step, a tile of
    about `tile` elements.
    """
    # Up to 16 rows per tile, so that the column sums written per row block (row blocks x K floats) stay
    # small against the inputs (B x K each).
    block_b = min(pow2(B), 16)
    block_k = max(16, min(pow2(K), tile // block_b))
    row_blocks = cdiv(B, block_b)
    # Enough column chunks to fill the device, each a whole number of BLOCK_K steps.
    chunks = max(1, min(cdiv(target_programs, row_blocks), cdiv(K, block_k)))
    chunk_k = cdiv(cdiv(K, chunks), block_k) * block_k
    block_r = min(pow2(row_blocks), max(1, tile // block_k))
    return block_b, block_k, chunk_k, row_blocks, cdiv(K, chunk_k), block_r


def num_tickets(B: int, K: int, device: torch.device) -> int:
    """How many int32 ticket counters the forward launch for (B, K) inputs on `device` uses."""
    _, _, _, row_blocks, chunks, _ = _fwd_blocks(B, K, *_launch_shape(device))
    return chunks + row_blocks + 1


def ticket_counters(B: int, K: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for the forward on `device` and its current stream; zero again after it."""
    return _tickets.get(device, num_tickets(B, K, device))


def dino_loss_forward(s1, s2, t1, t2, center, temps: torch.Tensor, counters: torch.Tensor, wrap=direct):
    """Launches the forward over (B, K) s1, s2, t1, t2 (any strides and float dtypes) and center (K,) (any stride).

    temps: (2,) [1 / student_temp, 1 / teacher_temp] in the accumulation dtype (float32, float64 if any
    input is float64); counters: at least `num_tickets(B, K, device)` int32 zeros (`ticket_counters`),
    zero again after the launch. wrap: applied to the jitted kernel (torch.library.wrap_triton in a
    custom op). Returns (loss 0-dim, teacher_mean (K,), lse (B, 4)), all in the accumulation dtype;
    lse holds per row the log-sum-exp of s1/ts, s2/ts, (t1-c)/tt, (t2-c)/tt for `dino_loss_backward`.
    """
    B, K = int(s1.shape[0]), int(s1.shape[1])
    device = s1.device
    acc = acc_dtype(s1, s2, t1, t2, center)
    block_b, block_k, chunk_k, row_blocks, chunks, block_r = _fwd_blocks(B, K, *_launch_shape(device))
    if counters.numel() < chunks + row_blocks + 1:
        raise ValueError(f"dino_loss_forward needs {chunks + row_blocks + 1} ticket counters, got {counters.numel()}")
    partial_cols = torch.empty((row_blocks, K), dtype=acc, device=device)
    partial_stats = torch.empty((chunks, NUM_STATS, B), dtype=acc, device=device)
    partial_loss = torch.empty(row_blocks, dtype=acc, device=device)
    lse = torch.empty((B, 4), dtype=acc, device=device)
    teacher_mean = torch.empty(K, dtype=acc, device=device)
    loss = torch.empty((), dtype=acc, device=device)
    wrap(dino_loss_fwd_kernel)[(row_blocks, chunks)](
        s1, s2, t1, t2, center, *s1.stride(), *s2.stride(), *t1.stride(), *t2.stride(), center.stride(0),
        temps, partial_cols, partial_stats, partial_loss, counters, lse, teacher_mean, loss,
        B, K, chunk_k,
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_R=block_r, BLOCK_P=min(pow2(row_blocks), 1024), ACC=tl_acc(acc),
        num_warps=8 if block_b * block_k >= 2048 else 4,
    )
    return loss, teacher_mean, lse


@functools.lru_cache(maxsize=256)
def _bwd_blocks(B: int, K: int, tile: int) -> tuple[int, int, int]:
    block_k = max(16, min(pow2(K), tile // 2))
    block_b = max(1, min(pow2(B), tile // block_k))
    return block_b, block_k, 8 if block_b * block_k >= 2048 else 4


def dino_loss_backward(s1, s2, t1, t2, center, temps: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor,
                       wrap=direct) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the loss w.r.t. s1 and s2: contiguous (B, K) tensors in their dtypes.

    lse: the forward's (B, 4); grad_loss: the 0-dim upstream gradient, read on the device. temps, wrap:
    as for `dino_loss_forward`.
    """
    B, K = int(s1.shape[0]), int(s1.shape[1])
    grad_s1 = torch.empty((B, K), dtype=s1.dtype, device=s1.device)
    grad_s2 = torch.empty((B, K), dtype=s2.dtype, device=s2.device)
    block_b, block_k, num_warps = _bwd_blocks(B, K, _launch_shape(s1.device)[1])
    wrap(dino_loss_bwd_kernel)[(cdiv(B, block_b), cdiv(K, block_k))](
        s1, s2, t1, t2, center, *s1.stride(), *s2.stride(), *t1.stride(), *t2.stride(), center.stride(0),
        temps, lse, grad_loss, grad_s1, grad_s2, B, K,
        BLOCK_B=block_b, BLOCK_K=block_k, ACC=tl_acc(lse.dtype), num_warps=num_warps,
    )
    return grad_s1, grad_s2
