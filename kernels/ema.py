"""One launch for the EMA of the parameters: target = lerp(target, online, 1 - momentum) over flat buffers.

The lerp is torch's, to the bit: for |w| < 0.5 it is fma(w, o - t, t), else fma(w - 1, o - t, o),
computed in float32 for float32/bf16/fp16 parameters (ATen's opmath) and in float64 for float64.
Triton's interpreter evaluates tl.fma as a rounded multiply then an add, so under the interpreter the
launch helper asks for the fma to be emulated in float64 (the float32 product is exact there).
Buffers (BN statistics, counters) are not averaged but copied; rela/ops/ema.py copies them with torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from .casts import cast_rne
from .launch import acc_dtype, cdiv, direct, tl_acc

BLOCK = 4096
# Flat parameter buffers are padded to a multiple of this many elements: every block is full, and the
# length's divisibility by 16 lets Triton vectorise the masked loads and stores (16-byte accesses).
PAD = BLOCK


@triton.jit
def ema_kernel(
    target_ptr, online_ptr, num_params, momentum_ptr, weight,
    MOMENTUM_FROM_PTR: tl.constexpr, EMULATE_FMA: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_params
    t = tl.load(target_ptr + offs, mask=mask).to(ACC)
    o = tl.load(online_ptr + offs, mask=mask).to(ACC)
    if MOMENTUM_FROM_PTR:
        # 1 - m in m's dtype, then rounded to the parameters' dtype: torch computes `1 - momentum` before the
        # lerp, and _foreach_lerp_ casts a tensor weight to the parameters' dtype (bf16: 0.01 -> 0.01001).
        w = cast_rne(1.0 - tl.load(momentum_ptr), target_ptr.dtype.element_ty).to(ACC)
    else:
        w = tl.cast(weight, ACC)
    small = tl.abs(w) < 0.5
    coeff = tl.where(small, w, w - 1.0)
    diff = o - t
    base = tl.where(small, t, o)
    if EMULATE_FMA:
        new = (coeff.to(tl.float64) * diff.to(tl.float64) + base.to(tl.float64)).to(ACC)
    else:
        new = tl.fma(coeff + tl.full([BLOCK], 0, ACC), diff, base)
    # Rounded to nearest even as torch rounds, also in the interpreter (which truncates bf16 by itself).
    tl.store(target_ptr + offs, cast_rne(new, target_ptr.dtype.element_ty), mask=mask)


def ema_launch(target: torch.Tensor, online: torch.Tensor, momentum: float | torch.Tensor, wrap=direct) -> None:
    """target <- lerp(target, online, 1 - momentum). One launch.

    target, online: 1-D, same length and floating dtype. momentum: a Python float or a 0-dim tensor on
    the same device, read in the kernel. wrap: applied to the jitted kernel before the launch
    (torch.library.wrap_triton in a custom op).
    """
    acc = tl_acc(acc_dtype(target))
    if acc == tl.float64 and not isinstance(momentum, torch.Tensor):
        # Triton passes Python floats as float32; torch lerps float64 with the float64 weight.
        momentum = torch.tensor(momentum, dtype=torch.float64, device=target.device)
    from_ptr = isinstance(momentum, torch.Tensor)
    num_params = int(target.numel())
    grid = (cdiv(num_params, BLOCK),)
    if grid[0] == 0:
        return
    wrap(ema_kernel)[grid](
        target, online, num_params,
        momentum if from_ptr else target, 0.0 if from_ptr else 1.0 - momentum,
        MOMENTUM_FROM_PTR=from_ptr, EMULATE_FMA=INTERPRETED and acc == tl.float32, ACC=acc,
        BLOCK=BLOCK, num_warps=8,
    )
