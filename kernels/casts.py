"""Float conversions that round as torch and the GPU do, in compiled kernels and in Triton's interpreter alike.

A compiled kernel converts float32 to bf16 with round-to-nearest-even (cvt.rn.bf16.f32), as torch does.
Triton's interpreter does not: it converts by dropping the low 16 bits (round toward zero), for an explicit
`.to(tl.bfloat16)` and for the implicit conversion of a float32 value stored to a bf16 pointer alike, so
about half of all bf16 outputs come out one ulp smaller in magnitude than on the GPU. `cast_rne` rounds
explicitly there. float16 needs nothing: the interpreter converts it with numpy, which rounds to nearest even.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRETED

# A global read inside a jitted function must be a constexpr.
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """x converted to `dtype`, rounded to nearest even; use it for every value stored to a bf16 tensor.

    x: a float32 (or float64) block or scalar; dtype: the destination element type, e.g.
    `out_ptr.dtype.element_ty`. Compiled, this is `x.to(dtype)`. Interpreted and for bf16, it rounds the
    float32 bits by integer arithmetic, as torch's c10::BFloat16 does: add 0x7FFF plus the lowest kept
    bit, keep the high 16 bits. Subnormals round like normal numbers, infinities stay, values past bf16's
    largest round to infinity, NaN stays NaN (0x7FC0; torch and the GPU pick other NaN bits). float64 goes
    through float32 first for bf16, as torch's float64 -> bf16 conversion does (it rounds twice).
    """
    if dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        if _INTERPRETED:
            bits = x32.to(tl.uint32, bitcast=True)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            # A NaN's payload could carry into the sign bit.
            rounded = tl.where(x32 != x32, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x32.to(tl.bfloat16)
    else:
        return x.to(dtype)
