"""Fixtures for the ops tests: Triton's interpreter on the CPU, a record of kernel launches, poisoned outputs.

TRITON_INTERPRET=1 is set per test (not for the whole session, which other test folders share); the
kernels' launch helpers read it at launch time, and `launches` records which form actually ran, so a
test can assert that the kernels ran in the interpreter rather than the reference in their place.
"""
from __future__ import annotations

import math

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import kernels.cosine_loss
import kernels.ema
from kernels import runtime


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, bool]]:
    """(kernel name, ran in the interpreter) for every kernel launched during the test."""
    record = []

    def spy(kernel):
        form = runtime.launchable(kernel)
        record.append((kernel.fn.__name__, isinstance(form, InterpretedFunction)))
        return form

    for module in (kernels.cosine_loss, kernels.ema):
        monkeypatch.setattr(module, "launchable", spy)
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
