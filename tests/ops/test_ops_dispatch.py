"""Which path an op takes: Triton (compiled or interpreted, chosen at call time) or the reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from kernels import runtime
from kernels.cosine_loss import cosine_loss_fwd_kernel
from rela.ops import (byol_loss, byol_loss_reference, ema_update_, fused_ops_mode, rela_loss,
                      rela_loss_reference, set_fused_ops)


def inputs(B=4, D=8):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(B, D, generator=generator) for _ in range(4)]


def test_cpu_tensors_run_the_reference_without_the_interpreter(monkeypatch, launches):
    monkeypatch.delenv("TRITON_INTERPRET")
    p1, p2, z1, z2 = inputs()
    assert torch.equal(byol_loss(p1, p2, z1, z2), byol_loss_reference(p1, p2, z1, z2))
    assert torch.equal(rela_loss(p1, z1), rela_loss_reference(p1, z1))
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9)
    assert launches == []


def test_cpu_tensors_run_the_kernels_under_the_interpreter(launches):
    p1, p2, z1, z2 = inputs()
    byol_loss(p1, p2, z1, z2)
    rela_loss(p1, z1)
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9)
    assert launches == [("cosine_loss_fwd_kernel", True), ("cosine_loss_fwd_kernel", True), ("ema_kernel", True)]


def test_fused_false_forces_the_reference(launches):
    p1, p2, z1, z2 = inputs()
    byol_loss(p1, p2, z1, z2, fused=False)
    rela_loss(p1, z1, fused=False)
    ema_update_(nn.Linear(3, 2), nn.Linear(3, 2), 0.9, fused=False)
    assert launches == []


def test_set_fused_ops_false_forces_the_reference_process_wide(launches):
    p1, p2, z1, z2 = inputs()
    assert fused_ops_mode() is None
    set_fused_ops(False)
    try:
        byol_loss(p1, p2, z1, z2)
        rela_loss(p1, z1)
        byol_loss(p1, p2, z1, z2, fused=True)  # the call's own choice wins
    finally:
        set_fused_ops(None)
    assert launches == [("cosine_loss_fwd_kernel", True)]


def test_fused_true_without_a_gpu_or_the_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        byol_loss(*inputs(), fused=True)


def test_launchable_reads_triton_interpret_at_launch_time(monkeypatch):
    assert isinstance(runtime.launchable(cosine_loss_fwd_kernel), InterpretedFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert isinstance(runtime.launchable(cosine_loss_fwd_kernel), JITFunction)


@pytest.mark.parametrize("kernel_module", ["kernels.cosine_loss", "kernels.ema"])
def test_kernels_call_only_triton_builtins(kernel_module):
    """A jitted callee (tl.sum, tl.cdiv, ...) breaks the interpreter when Triton was imported compiled."""
    import importlib
    import inspect
    import re

    import triton.language as tl

    module = importlib.import_module(kernel_module)
    allowed = {"constexpr", "standard._sum_combine"}
    for kernel in (k for k in vars(module).values() if isinstance(k, (JITFunction, InterpretedFunction))):
        for name in set(re.findall(r"\btl\.([\w.]+)", inspect.getsource(kernel.fn))):
            obj = tl
            for part in name.split("."):
                obj = getattr(obj, part)
            assert name in allowed or isinstance(obj, tl.dtype) or tl.core.is_builtin(obj), (kernel.fn.__name__, name)
