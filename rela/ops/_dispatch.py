"""Where an op runs: the Triton kernels or the pure-torch reference.

`fused=None` (auto) runs the kernels for CUDA tensors and the reference for CPU tensors. `fused=False`
forces the reference. `fused=True` demands the kernels: on CUDA tensors, or on CPU tensors in Triton's
interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported (triton.jit reads it when it
defines a kernel, so the kernels are interpreted or compiled for good from their import). Auto never
picks the interpreter: it is for tests, and about a thousand times slower than the reference.
"""
from __future__ import annotations

import torch

try:
    from rela.kernels import INTERPRETED
    HAVE_TRITON = True
except ImportError:  # no Triton on this machine: every op runs its reference
    INTERPRETED = HAVE_TRITON = False


def use_kernels(fused: bool | None, device: torch.device) -> bool:
    """Whether an op on `device` runs its Triton kernels, given the op's `fused` argument."""
    if fused is None:
        return HAVE_TRITON and device.type == "cuda"
    if fused is False:
        return False
    if HAVE_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED)):
        return True
    raise RuntimeError(
        f"fused=True needs Triton and CUDA tensors (or, for CPU tensors, TRITON_INTERPRET=1 set before "
        f"Triton is imported); got tensors on {device}" + ("" if HAVE_TRITON else " and no Triton"))
