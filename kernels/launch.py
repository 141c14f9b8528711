"""What the kernels' launch helpers share: block arithmetic, the accumulation dtype, how many programs fill
the device, ticket counters, and the default launch wrap. Host code only, nothing jitted.
"""
from __future__ import annotations

import torch
import triton.language as tl


def direct(kernel):
    """A launch helper's default `wrap`: the jitted kernel itself (a custom op passes torch.library.wrap_triton)."""
    return kernel


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    # triton.next_power_of_2 and triton.cdiv are constexpr functions: a few microseconds per host call.
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a kernel accumulates in over `tensors`: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_acc(dtype: torch.dtype):
    """`acc_dtype`'s result as the kernels' ACC constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_num_sms: dict[torch.device, int] = {}


def programs_to_fill(device: torch.device) -> int:
    """How many programs a launch aims for on `device`: 4 per SM on CUDA; 16 elsewhere, where Triton's
    interpreter runs the programs one after the other (few programs, wide tiles)."""
    if device.type != "cuda":
        return 16
    sms = _num_sms.get(device)
    if sms is None:
        sms = _num_sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return 4 * sms


class TicketCounters:
    """int32 ticket counters of one kernel: one buffer per device and stream (launches on one stream never
    overlap), zeroed when made; every launch leaves the counters it used at zero, so a buffer is reused as
    it is. A launch that needs more counters than the buffer holds gets a new one, of at least `minimum`."""

    def __init__(self, minimum: int = 1):
        self.minimum = minimum
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def get(self, device: torch.device, needed: int = 1) -> torch.Tensor:
        """At least `needed` zeroed counters for `device` and its current stream."""
        key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
        counters = self._buffers.get(key)
        if counters is None or counters.numel() < needed:
            counters = self._buffers[key] = torch.zeros(max(needed, self.minimum), dtype=torch.int32, device=device)
        return counters
