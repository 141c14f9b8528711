"""Which path an op takes: the Triton kernels (interpreted on CPU tensors) or the reference."""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn

import rela.kernels.cosine_loss
import rela.kernels.ema
from rela.ops import _dispatch, byol_loss, byol_loss_reference, ema_update_, rela_loss, rela_loss_reference

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def inputs(B=4, D=8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(B, D, generator=generator) for _ in range(4)]


@pytest.mark.parametrize("fused, device, interpreted, kernels", [
    (None, CUDA, False, True), (None, CPU, False, False), (None, CPU, True, False),
    (False, CUDA, False, False), (False, CPU, True, False),
    (True, CUDA, False, True), (True, CPU, True, True),
])
def test_dispatch_table(monkeypatch, fused, device, interpreted, kernels):
    monkeypatch.setattr(_dispatch, "INTERPRETED", interpreted)
    assert _dispatch.use_kernels(fused, device) is kernels


def test_fused_true_on_cpu_tensors_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_dispatch, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 set before Triton is imported"):
        byol_loss(*inputs(), fused=True)


def test_auto_runs_the_reference_on_cpu_tensors_even_under_the_interpreter(launches):
    p1, p2, z1, z2 = inputs()
    assert torch.equal(byol_loss(p1, p2, z1, z2), byol_loss_reference(p1, p2, z1, z2))
    assert torch.equal(rela_loss(p1, z1), rela_loss_reference(p1, z1))
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9)
    assert launches == []


def test_fused_true_runs_the_kernels_on_cpu_tensors_under_the_interpreter(launches):
    p1, p2, z1, z2 = inputs()
    byol_loss(p1, p2, z1, z2, fused=True)
    rela_loss(p1, z1, fused=True)
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9, fused=True)
    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_fwd_kernel", "ema_kernel"]


@pytest.mark.parametrize("module", [rela.kernels.cosine_loss, rela.kernels.ema], ids=lambda m: m.__name__)
def test_kernels_use_only_public_triton(module):
    """No private names (tl.standard._sum_combine and the like): they change between Triton releases."""
    assert re.findall(r"\b(?:tl|triton)(?:\.\w+)*\._\w+", inspect.getsource(module)) == []
