"""Where an op runs: the Triton kernels or the pure-torch reference.

`fused=None` (auto) runs the kernels for CUDA tensors and the reference for CPU tensors. `fused=False`
forces the reference. `fused=True` demands the kernels: on CUDA tensors, or on CPU tensors in Triton's
interpreter, which needs TRITON_INTERPRET=1 set before Triton is imported (triton.jit reads it when it
defines a kernel, so the kernels are interpreted or compiled for good from their import). Auto never
picks the interpreter: it is for tests, and about a thousand times slower than the reference.

Where `rela.kernels` does not import (no Triton, a broken one, or a source tree that was never installed:
setup.py maps kernels/ to rela.kernels), nothing falls back in silence on CUDA tensors: auto warns once,
with the import error, and runs the reference; `fused=True` (`--fused-ops on`) raises.
"""
from __future__ import annotations

import warnings

import torch

try:
    from rela.kernels import INTERPRETED
    HAVE_TRITON, KERNELS_IMPORT_ERROR = True, None
except Exception as err:  # absent, broken or not installed: every op runs its reference, and says why on CUDA
    INTERPRETED = HAVE_TRITON = False
    KERNELS_IMPORT_ERROR = f"{type(err).__name__}: {err}"

_warned_about_reference_on_cuda = False


def kernels_unavailable_reason() -> str | None:
    """Why the kernels cannot run here (rela.kernels' import error), or None when they import."""
    if HAVE_TRITON:
        return None
    return f"rela.kernels (the Triton kernels) does not import: {KERNELS_IMPORT_ERROR}"


def use_kernels(fused: bool | None, device: torch.device) -> bool:
    """Whether an op on `device` runs its Triton kernels, given the op's `fused` argument."""
    if fused is None:
        if device.type == "cuda" and not HAVE_TRITON:
            _warn_once_about_reference_on_cuda()
        return HAVE_TRITON and device.type == "cuda"
    if fused is False:
        return False
    if HAVE_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED)):
        return True
    if not HAVE_TRITON:
        raise RuntimeError(f"fused=True (--fused-ops on) needs the Triton kernels, but {kernels_unavailable_reason()}; "
                           f"install Triton and the package (pip install --no-build-isolation -e .), or run with "
                           f"--fused-ops off")
    raise RuntimeError(
        f"fused=True needs CUDA tensors (or, for CPU tensors, TRITON_INTERPRET=1 set before Triton is imported); "
        f"got tensors on {device}")


def _warn_once_about_reference_on_cuda() -> None:
    global _warned_about_reference_on_cuda
    if _warned_about_reference_on_cuda:
        return
    _warned_about_reference_on_cuda = True
    warnings.warn(f"the fused ops run their pure-torch references on CUDA tensors: {kernels_unavailable_reason()} "
                  f"(--fused-ops off silences this)", RuntimeWarning, stacklevel=3)
