"""Where an op runs: the Triton kernels or the pure-torch reference.

CUDA tensors go to Triton. CPU tensors go to the reference, or to Triton's interpreter when
TRITON_INTERPRET=1 is set at the time of the call (tests use this to run the kernels without a GPU).
`fused=False` forces the reference, `fused=True` demands the kernels, `fused=None` decides as above;
`set_fused_ops` changes what `fused=None` means for the whole process (the trainer's --fused-ops).
"""
from __future__ import annotations

import torch

try:
    from kernels.runtime import interpreting
except ImportError:  # no Triton on this machine: every op runs its reference
    interpreting = None

_default: bool | None = None


def set_fused_ops(mode: bool | None) -> None:
    """Process-wide default for `fused=None`: True (always kernels), False (always references), None (auto)."""
    global _default
    if mode not in (True, False, None):
        raise ValueError(f"set_fused_ops takes True, False or None, got {mode!r}")
    _default = mode


def fused_ops_mode() -> bool | None:
    return _default


def use_kernels(fused: bool | None, device: torch.device) -> bool:
    """Whether an op on `device` runs its Triton kernels, given the op's `fused` argument."""
    if fused is None:
        fused = _default
    if fused is False:
        return False
    runnable = interpreting is not None and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if fused is True and not runnable:
        raise RuntimeError(
            f"fused=True needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            f"got tensors on {device}" + ("" if interpreting is not None else " and no Triton"))
    return runnable
