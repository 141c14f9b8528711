"""Fixtures for the ops tests: a record of kernel launches, poisoned outputs.

The kernels run on CPU tensors in Triton's interpreter, which needs TRITON_INTERPRET=1 in the
environment before Triton is imported: tests/conftest.py sets it on a machine without a GPU, and
.ci/run sets it for this folder's own process.
"""
from __future__ import annotations

import math

import pytest
import torch

import rela.kernels.cosine_loss
import rela.kernels.ema
from rela.kernels import INTERPRETED

KERNELS = {rela.kernels.cosine_loss: ("cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel"),
           rela.kernels.ema: ("ema_kernel",)}


class _RecordedKernel:
    """Stands in for a jitted kernel in its module: `kernel[grid](...)` records the name, then launches."""

    def __init__(self, kernel, record: list[str]):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        self.record.append(self.kernel.fn.__name__)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> list[str]:
    """The name of every kernel launched during the test, in order."""
    if not INTERPRETED:  # the tests hand the kernels CPU tensors
        pytest.fail("the kernel tests need TRITON_INTERPRET=1 set before Triton is imported "
                    "(run them as `TRITON_INTERPRET=1 python -m pytest tests/ops`)", pytrace=False)
    record = []
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, _RecordedKernel(getattr(module, name), record))
    return record


@pytest.fixture
def poison(monkeypatch):
    """Makes torch.empty return NaN-filled (floats) or -1-filled (integers) tensors during the test."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(math.nan if t.is_floating_point() else -1)
        return t

    monkeypatch.setattr(torch, "empty", poisoned_empty)
