"""The fused ops as torch custom ops (torch.library.triton_op): opcheck, fake implementations, torch.compile.

What runs where on a machine without a GPU:
- torch.library.opcheck's test_schema and test_autograd_registration run the ops for real, so they need
  the kernels runnable: here, in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).
- opcheck's test_faketensor and test_aot_dispatch_dynamic cannot run under the interpreter: triton_op
  registers the op's own function as its fake implementation, and under the interpreter wrap_triton hands
  back the plain interpreted kernel, which is then launched on fake tensors (it reads their data pointers
  and fails). Without the interpreter they first run the op on real tensors, which needs a GPU. They run in
  tests/ops/test_ops_gpu.py. Here instead the fake implementations run on meta tensors in a process
  without the interpreter, and torch.compile(fullgraph=True) traces through the ops into the kernels
  (the forward and backward graphs hold triton_kernel_wrapper_functional, no graph break).
- The EMA op under torch.compile is checked on the GPU only: without a driver, Triton cannot analyse which
  pointers a kernel writes, torch then assumes every input is written, and AOTAutograd rejects the
  writes to `online` that the op's schema does not declare.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rela.kernels import INTERPRETED
from rela.ops import (byol_loss, byol_loss_fused, byol_loss_reference, prepare_ema_, rela_loss, rela_loss_fused,
                      rela_loss_reference)
from rela.ops.cosine_losses import EPS

OPCHECK_ON_THE_INTERPRETER = ("test_schema", "test_autograd_registration")


def _rows(B, D, dtype, generator, differentiated):
    return torch.randn(B, D, generator=generator).to(dtype).requires_grad_(differentiated)


def _loss_op_cases():
    generator = torch.Generator().manual_seed(0)
    cases = []
    for B, D, dtype in [(1, 1, torch.float32), (5, 33, torch.bfloat16), (3, 70, torch.float64)]:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        counter, eps = torch.zeros(1, dtype=torch.int32), torch.full((), EPS, dtype=acc)
        p1, p2 = (_rows(B, D, dtype, generator, True) for _ in range(2))
        z1, z2 = (_rows(B, D, dtype, generator, False) for _ in range(2))
        _, stats = torch.ops.rela.byol_loss_fwd(p1, p2, z1, z2, counter, eps)
        cases.append(("byol_loss_fwd", (p1, p2, z1, z2, counter, eps)))
        cases.append(("byol_loss_bwd", (p1, p2, z1, z2, stats.detach(), torch.ones((), dtype=acc))))
        _, stats = torch.ops.rela.rela_loss_fwd(p1, z1, counter, eps)
        cases.append(("rela_loss_fwd", (p1, z1, counter, eps)))
        cases.append(("rela_loss_bwd", (p1, z1, stats.detach(), torch.full((), 0.5, dtype=acc))))
    return cases


@pytest.mark.parametrize("case", range(12))
def test_loss_ops_pass_opcheck_under_the_interpreter(case, launches):
    name, args = _loss_op_cases()[case]
    torch.library.opcheck(getattr(torch.ops.rela, name), args, test_utils=OPCHECK_ON_THE_INTERPRETER)
    assert launches, "the op ran no kernel"


@pytest.mark.parametrize("momentum", ["tensor", "float"])
def test_ema_op_passes_opcheck_under_the_interpreter(momentum, launches):
    generator = torch.Generator().manual_seed(1)
    target, online = (torch.randn(8192, generator=generator) for _ in range(2))
    args = ((target, online, torch.tensor(0.99), 0.0) if momentum == "tensor" else (target, online, None, 0.99))
    expected = torch.lerp(target, online, 1 - 0.99)
    torch.library.opcheck(torch.ops.rela.ema_lerp_, args, test_utils=OPCHECK_ON_THE_INTERPRETER)
    torch.ops.rela.ema_lerp_(*args)
    torch.testing.assert_close(target, expected)


def test_pair_update_goes_through_the_custom_op(monkeypatch, launches):
    calls = []
    real = torch.ops.rela.ema_lerp_

    def record(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(torch.ops.rela, "ema_lerp_", record)
    target, online = nn.Linear(3, 4), nn.Linear(3, 4)
    prepare_ema_(target, online, fused=True).update(0.5)
    assert len(calls) == 1 and launches == ["ema_kernel"]


def _small(a, b, c, d):
    return 0.5 * byol_loss(a, b, c, d, fused=False) + rela_loss(a, c, fused=False)


def test_compile_fullgraph_of_the_references_has_no_graph_break():
    """fused=False under torch.compile(fullgraph=True): a graph break would raise; values as in eager."""
    generator = torch.Generator().manual_seed(2)
    inputs = [_rows(6, 17, torch.float32, generator, i < 2) for i in range(4)]
    torch._dynamo.reset()
    compiled = torch.compile(_small, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    expected = 0.5 * byol_loss_reference(*inputs) + rela_loss_reference(inputs[0], inputs[2])
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, inputs[:2])
    torch.testing.assert_close(grads, torch.autograd.grad(expected, inputs[:2]))


# ---- without the interpreter (this process reruns the tests below in a fresh one when it is interpreted)

def test_fake_implementations_give_the_reference_shapes_and_dtypes_on_meta_tensors():
    """byol_loss_fused/rela_loss_fused are the kernel path of byol_loss/rela_loss without the dispatch
    (which sends only CUDA tensors, or CPU ones under the interpreter, to the kernels)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        p1, p2, z1, z2 = (torch.empty(7, 33, dtype=dtype, device="meta", requires_grad=i < 2) for i in range(4))
        loss = byol_loss_fused(p1, p2, z1, z2)
        assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss.backward()
        assert p1.grad.shape == p1.shape and p1.grad.dtype == dtype and z1.grad is None
        y_hat = torch.empty(5, 2, 9, dtype=dtype, device="meta")[:, 1].requires_grad_()  # strided
        rela_loss_fused(y_hat, z1[:5, :9]).backward()
        assert y_hat.grad.shape == (5, 9) and y_hat.grad.dtype == dtype


def _compile_keeping_graphs(fn, graphs: list[str]):
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))


@pytest.mark.parametrize("loss", ["byol", "rela"])
def test_compile_fullgraph_traces_through_the_loss_ops_into_the_kernels(loss):
    """One op per graph: with the pessimistic analysis (no driver, see the module docstring) two ops reading
    one input look like two writers of it to AOTAutograd; on the GPU tests/ops/test_ops_gpu.py compiles both."""
    graphs = []
    fn = (lambda p1, p2, z1, z2: 2 * byol_loss_fused(p1, p2, z1, z2)) if loss == "byol" else \
        (lambda p1, p2, z1, z2: 2 * rela_loss_fused(p1, z2))
    compiled = _compile_keeping_graphs(fn, graphs)
    p1, p2, z1, z2 = (torch.empty(9, 65, device="meta", requires_grad=i < 2) for i in range(4))
    compiled(p1, p2, z1, z2).backward()
    forward, backward = graphs
    assert forward.count("triton_kernel_wrapper_functional(") == 1
    assert backward.count("triton_kernel_wrapper_functional(") == 1


if INTERPRETED:
    del (test_fake_implementations_give_the_reference_shapes_and_dtypes_on_meta_tensors,
         test_compile_fullgraph_traces_through_the_loss_ops_into_the_kernels)

    def test_the_meta_and_compile_checks_pass_in_a_process_without_the_interpreter():
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "meta or traces"],
            cwd=Path(__file__).parents[2], env={**os.environ, "TRITON_INTERPRET": "0"},
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert "3 passed" in result.stdout, result.stdout[-3000:]
