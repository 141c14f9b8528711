"""dino_loss: the kernels (in Triton's interpreter) and the reference against a float64 transcription of
DINO's two-crop loss; the custom ops (opcheck; fake implementations, torch.compile and the sm_90 build in a
process without the interpreter); input checks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

import rela.kernels.dino_loss
from rela.kernels import INTERPRETED
from rela.kernels.dino_loss import dino_loss_bwd_kernel, dino_loss_fwd_kernel, num_tickets
from rela.ops import dino_loss, dino_loss_fused, dino_loss_reference
from test_ops_kernels_compile import compile_for_h100, compiler  # noqa: F401 (a fixture)
from test_ops_losses import non_contiguous

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04  # DINO's (the teacher's after its warm-up from 0.04 is 0.04 to 0.07)

# Loss: error relative to max(1, |loss|). teacher_mean: error relative to max|t|. Gradients: error relative
# to the gradient's natural scale 0.5 / (B * student_temp) (softmax - q lies in [-1, 1]). The gradients are
# stored in the students' dtype, rounded to nearest even (half an ulp, 2^-8 relative for bf16) in the
# interpreter as on the GPU: test_ops_numerics.py checks the rounding to the bit.
TOLERANCE = {
    torch.float32: {"loss": 1e-6, "mean": 5e-7, "grad": 2e-5},
    torch.bfloat16: {"loss": 1e-6, "mean": 5e-7, "grad": 1e-2},
    torch.float16: {"loss": 1e-6, "mean": 5e-7, "grad": 2e-3},
    torch.float64: {"loss": 1e-12, "mean": 1e-14, "grad": 1e-12},
}
# (B, K): one row and column; odd K; several row blocks and column chunks (the tickets); K past two chunks.
SHAPES = [(1, 1), (1, 7), (3, 1000), (33, 600), (2, 4099)]


def transcription(s1, s2, t1, t2, center, student_temp, teacher_temp):
    """DINO's two-crop loss and the teacher's batch mean in float64, written out from the formula."""
    s1, s2, t1, t2 = (x.detach().double().requires_grad_(i < 2) for i, x in enumerate((s1, s2, t1, t2)))
    c = center.detach().double().reshape(1, -1)
    B = s1.shape[0]
    q1 = torch.exp((t1 - c) / teacher_temp - torch.logsumexp((t1 - c) / teacher_temp, dim=1, keepdim=True))
    q2 = torch.exp((t2 - c) / teacher_temp - torch.logsumexp((t2 - c) / teacher_temp, dim=1, keepdim=True))
    log_p1 = s1 / student_temp - torch.logsumexp(s1 / student_temp, dim=1, keepdim=True)
    log_p2 = s2 / student_temp - torch.logsumexp(s2 / student_temp, dim=1, keepdim=True)
    loss = 0.5 * ((-q1 * log_p2).sum(1).sum() / B + (-q2 * log_p1).sum(1).sum() / B)
    teacher_mean = (t1.sum(0) + t2.sum(0)) / (2 * B)
    grad_s1, grad_s2 = torch.autograd.grad(loss, (s1, s2))
    return loss.detach(), teacher_mean.detach(), (grad_s1, grad_s2)


def inputs(B, K, dtype, seed, teacher_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    s1, s2, t1, t2 = (torch.randn(B, K, generator=generator) for _ in range(4))
    center = 0.3 * torch.randn(K, generator=generator)
    t1, t2 = teacher_scale * t1, teacher_scale * t2
    return [s1.to(dtype).requires_grad_(), s2.to(dtype).requires_grad_(), t1.to(dtype), t2.to(dtype), center]


def errors(loss, teacher_mean, grads, expected, s1, t1, t2, student_temp=STUDENT_TEMP) -> dict:
    expected_loss, expected_mean, expected_grads = expected
    B = s1.shape[0]
    if not all(torch.isfinite(x).all() for x in (loss, teacher_mean, *grads)):
        return {"loss": float("inf"), "mean": float("inf"), "grad": float("inf")}
    t_scale = max(t1.abs().max().item(), t2.abs().max().item(), 1e-30)
    grad_scale = 0.5 / (B * student_temp)
    return {
        "loss": abs(loss.item() - expected_loss.item()) / max(1.0, abs(expected_loss.item())),
        "mean": (teacher_mean.double() - expected_mean).abs().max().item() / t_scale,
        "grad": max((g.double() - e).abs().max().item() for g, e in zip(grads, expected_grads)) / grad_scale,
    }


@pytest.fixture
def dino_launches(monkeypatch) -> list[str]:
    """The DINO kernels launched during the test, in order (as conftest's `launches` for the others)."""
    if not INTERPRETED:
        pytest.fail("the kernel tests need TRITON_INTERPRET=1 set before Triton is imported "
                    "(run them as `TRITON_INTERPRET=1 python -m pytest tests/ops`)", pytrace=False)
    record = []
    for name in ("dino_loss_fwd_kernel", "dino_loss_bwd_kernel"):
        kernel = getattr(rela.kernels.dino_loss, name)

        class Recorded:
            def __getitem__(self, grid, kernel=kernel, name=name):
                record.append(name)
                return kernel[grid]

        monkeypatch.setattr(rela.kernels.dino_loss, name, Recorded())
    return record


def run(fn, s1, s2, t1, t2, center, **temps):
    loss, teacher_mean = fn(s1, s2, t1, t2, center, temps.get("student_temp", STUDENT_TEMP),
                            temps.get("teacher_temp", TEACHER_TEMP))
    return loss, teacher_mean, torch.autograd.grad(loss, (s1, s2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B, K", SHAPES)
def test_fused_dino_loss_matches_the_float64_transcription(B, K, dtype, dino_launches, poison):
    s1, s2, t1, t2, center = inputs(B, K, dtype, seed=B * 10007 + K)
    expected = transcription(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)

    loss, teacher_mean, grads = run(lambda *a: dino_loss(*a, fused=True), s1, s2, t1, t2, center)

    assert dino_launches == ["dino_loss_fwd_kernel", "dino_loss_bwd_kernel"]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert teacher_mean.dtype == torch.float32 and teacher_mean.shape == (K,) and not teacher_mean.requires_grad
    assert all(g.dtype == dtype and g.shape == (B, K) for g in grads)
    err = errors(loss, teacher_mean, grads, expected, s1, t1, t2)
    assert all(err[k] <= TOLERANCE[dtype][k] for k in err), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("B, K", SHAPES + [(32, 4096)])
def test_reference_matches_the_float64_transcription(B, K, dtype):
    s1, s2, t1, t2, center = inputs(B, K, dtype, seed=B + K)
    expected = transcription(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)
    loss, teacher_mean, grads = run(dino_loss_reference, s1, s2, t1, t2, center)
    assert loss.dtype == teacher_mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = errors(loss, teacher_mean, grads, expected, s1, t1, t2)
    assert all(err[k] <= TOLERANCE[dtype][k] for k in err), err
    # fused=None on CPU tensors is the reference.
    assert torch.equal(dino_loss(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)[0], loss)


@pytest.mark.parametrize("case", ["float64", "float16", "sharp_teacher", "temperatures_1", "center_1xK"])
def test_fused_dino_loss_other_dtypes_temperatures_and_scales(case, dino_launches, poison):
    """float64 throughout; fp16; a teacher so sharp that (t - c) / teacher_temp reaches thousands (the
    running maxima keep exp finite); unit temperatures; center given as (1, K)."""
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(case, torch.float32)
    s1, s2, t1, t2, center = inputs(5, 333, dtype, seed=11, teacher_scale=100.0 if case == "sharp_teacher" else 1.0)
    if case == "float64":
        center = center.double()
    if case == "center_1xK":
        center = center[None, :]
    temps = {"student_temp": 1.0, "teacher_temp": 1.0} if case == "temperatures_1" else {}
    expected = transcription(s1, s2, t1, t2, center, temps.get("student_temp", STUDENT_TEMP),
                             temps.get("teacher_temp", TEACHER_TEMP))

    loss, teacher_mean, grads = run(lambda *a: dino_loss(*a, fused=True), s1, s2, t1, t2, center, **temps)

    assert len(dino_launches) == 2
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = errors(loss, teacher_mean, grads, expected, s1, t1, t2, temps.get("student_temp", STUDENT_TEMP))
    assert all(err[k] <= TOLERANCE[dtype][k] for k in err), err


@pytest.mark.parametrize("kind", ["transposed", "column_step", "row_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_give_the_contiguous_results(kind, dtype, dino_launches, poison):
    s1, s2, t1, t2, center = inputs(9, 257, dtype, seed=7)
    expected = run(lambda *a: dino_loss(*a, fused=True), s1, s2, t1, t2, center)
    strided = [non_contiguous(x.detach(), kind).requires_grad_(i < 2) for i, x in enumerate((s1, s2, t1, t2))]
    strided_center = torch.zeros(2 * center.numel())[1::2]  # stride 2
    strided_center.copy_(center)

    got = run(lambda *a: dino_loss(*a, fused=True), *strided, strided_center)

    assert len(dino_launches) == 4
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert all(torch.equal(g, e) for g, e in zip(got[2], expected[2]))


def test_fused_function_passes_gradcheck_in_float64(dino_launches):
    s1, s2, t1, t2, center = inputs(2, 3, torch.float64, seed=5)
    s1, s2 = (s.detach().requires_grad_() for s in (s1, s2))
    assert torch.autograd.gradcheck(lambda a, b: dino_loss_fused(a, b, t1, t2, center, 0.5, 0.3)[0], (s1, s2),
                                    eps=1e-6, atol=1e-8)
    assert "dino_loss_bwd_kernel" in dino_launches


def test_teacher_and_center_get_no_gradient_and_center_is_unchanged(dino_launches):
    s1, s2, t1, t2, center = inputs(4, 20, torch.float32, seed=3)
    t1, t2, center = (x.requires_grad_() for x in (t1, t2, center))
    before = center.detach().clone()
    loss, teacher_mean = dino_loss(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=True)
    loss.backward()
    assert len(dino_launches) == 2
    assert t1.grad is None and t2.grad is None and center.grad is None
    assert not teacher_mean.requires_grad and teacher_mean.grad_fn is None
    assert torch.equal(center.detach(), before)
    assert s1.grad is not None and s2.grad is not None


def test_mixed_dtypes_and_upstream_gradient(dino_launches):
    """bf16 students against float32 teachers and a float32 center; an upstream gradient other than 1."""
    s1, s2, t1, t2, center = inputs(6, 130, torch.float32, seed=1)
    s1, s2 = (s.detach().bfloat16().requires_grad_() for s in (s1, s2))
    loss, teacher_mean = dino_loss(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=True)
    grads = torch.autograd.grad(3.0 * loss, (s1, s2))
    expected_loss, expected_mean, expected_grads = transcription(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)
    err = errors(loss, teacher_mean, [g / 3.0 for g in grads], (expected_loss, expected_mean, expected_grads),
                 s1, t1, t2)
    assert len(dino_launches) == 2 and grads[0].dtype == torch.bfloat16
    assert all(err[k] <= TOLERANCE[torch.bfloat16][k] for k in err), err


def test_repeated_launches_agree_to_the_bit_and_leave_the_counters_at_zero(dino_launches, poison):
    """Every ticket counter is reset by its last taker; the partials are added in one order."""
    s1, s2, t1, t2, center = inputs(33, 600, torch.float32, seed=2)
    results = [dino_loss(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=True) for _ in range(3)]
    counters = rela.kernels.dino_loss.ticket_counters(33, 600, s1.device)
    assert len(dino_launches) == 3 and num_tickets(33, 600, s1.device) > 3  # several row blocks and chunks
    assert torch.isfinite(results[0][0]) and not counters.any()
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results)


def test_bad_inputs_raise_value_errors():
    a = torch.randn(4, 8)
    c = torch.zeros(8)
    with pytest.raises(ValueError, match="s2"):
        dino_loss(a, torch.randn(4, 9), a, a, c, 0.1, 0.04)
    with pytest.raises(ValueError, match="t1"):
        dino_loss(a, a, torch.randn(8), a, c, 0.1, 0.04)
    with pytest.raises(ValueError, match="B, K >= 1"):
        dino_loss(*torch.randn(4, 0, 8), torch.zeros(8), 0.1, 0.04)
    with pytest.raises(ValueError, match="center"):
        dino_loss(a, a, a, a, torch.zeros(2, 8), 0.1, 0.04)
    with pytest.raises(ValueError, match="center"):
        dino_loss(a, a, a, a, torch.zeros(7), 0.1, 0.04)
    with pytest.raises(ValueError, match="floating point"):
        dino_loss(a, a, a.long(), a, c, 0.1, 0.04)
    with pytest.raises(ValueError, match="t2 is on meta"):
        dino_loss(a, a, a, a.to("meta"), c, 0.1, 0.04)
    with pytest.raises(ValueError, match="center is on meta"):
        dino_loss(a, a, a, a, c.to("meta"), 0.1, 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(a, a, a, a, c, 0.1, 0.0)
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(a, a, a, a, c, float("nan"), 0.04)


# ---- the custom ops

OPCHECK_ON_THE_INTERPRETER = ("test_schema", "test_autograd_registration")  # see test_ops_custom.py


def _op_cases():
    cases = []
    for B, K, dtype in [(1, 1, torch.float32), (5, 33, torch.bfloat16), (3, 70, torch.float64)]:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        s1, s2, t1, t2, center = inputs(B, K, dtype, seed=K)
        center = center.to(acc)
        temps = torch.tensor([1 / STUDENT_TEMP, 1 / TEACHER_TEMP], dtype=acc)
        counters = torch.zeros(num_tickets(B, K, s1.device), dtype=torch.int32)
        _, _, lse = torch.ops.rela.dino_loss_fwd(s1, s2, t1, t2, center, temps, counters)
        cases.append(("dino_loss_fwd", (s1, s2, t1, t2, center, temps, counters)))
        cases.append(("dino_loss_bwd", (s1, s2, t1, t2, center, temps, lse.detach(), torch.full((), 0.5, dtype=acc))))
    return cases


@pytest.mark.parametrize("case", range(6))
def test_dino_ops_pass_opcheck_under_the_interpreter(case, dino_launches):
    name, args = _op_cases()[case]
    torch.library.opcheck(getattr(torch.ops.rela, name), args, test_utils=OPCHECK_ON_THE_INTERPRETER)
    assert dino_launches, "the op ran no kernel"


def test_compile_fullgraph_of_the_reference_has_no_graph_break():
    s1, s2, t1, t2, center = inputs(6, 17, torch.float32, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: dino_loss(*a, STUDENT_TEMP, TEACHER_TEMP, fused=False), fullgraph=True,
                             backend="aot_eager")
    loss, teacher_mean = compiled(s1, s2, t1, t2, center)
    expected_loss, expected_mean = dino_loss_reference(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)
    torch.testing.assert_close((loss, teacher_mean), (expected_loss, expected_mean))
    torch.testing.assert_close(torch.autograd.grad(loss, (s1, s2)), torch.autograd.grad(expected_loss, (s1, s2)))


# ---- without the interpreter (this process reruns the tests below in a fresh one when it is interpreted)

def test_fake_implementation_gives_the_reference_shapes_and_dtypes_on_meta_tensors():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        s1, s2, t1, t2 = (torch.empty(7, 33, dtype=dtype, device="meta", requires_grad=i < 2) for i in range(4))
        loss, teacher_mean = dino_loss_fused(s1, s2, t1, t2, torch.empty(1, 33, device="meta"), 0.1, 0.04)
        assert loss.shape == () and loss.dtype == acc and teacher_mean.shape == (33,) and teacher_mean.dtype == acc
        loss.backward()
        assert s1.grad.shape == s1.shape and s1.grad.dtype == dtype and t1.grad is None


def test_compile_fullgraph_traces_through_the_dino_ops_into_the_kernels():
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: 2 * dino_loss_fused(*a, 0.1, 0.04)[0], fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    s1, s2, t1, t2 = (torch.empty(9, 65, device="meta", requires_grad=i < 2) for i in range(4))
    compiled(s1, s2, t1, t2, torch.empty(65, device="meta")).backward()
    forward, backward = graphs
    assert forward.count("triton_kernel_wrapper_functional(") == 1
    assert backward.count("triton_kernel_wrapper_functional(") == 1


def _dino_types(inputs: str, acc: str) -> dict[str, str]:
    types = {f"{x}_ptr": f"*{inputs}" for x in ("s1", "s2", "t1", "t2", "grad_s1", "grad_s2")}
    types.update({x: f"*{acc}" for x in ("center_ptr", "temps_ptr", "partial_cols_ptr", "partial_stats_ptr",
                                           "partial_loss_ptr", "lse_ptr", "teacher_mean_ptr", "loss_ptr",
                                           "grad_loss_ptr")})
    types["counter_ptr"] = "*i32"
    return types


@pytest.mark.parametrize("inputs_dtype, acc", [("bf16", "fp32"), ("fp32", "fp32"), ("fp64", "fp64")])
def test_dino_kernels_compile_for_sm90(compiler, inputs_dtype, acc):
    acc_dtype = tl.float64 if acc == "fp64" else tl.float32
    types = _dino_types(inputs_dtype, acc)
    fwd = compile_for_h100(compiler, dino_loss_fwd_kernel, types,
                           dict(BLOCK_B=16, BLOCK_K=128, BLOCK_R=16, BLOCK_P=16, ACC=acc_dtype))
    bwd = compile_for_h100(compiler, dino_loss_bwd_kernel, types, dict(BLOCK_B=2, BLOCK_K=1024, ACC=acc_dtype))
    assert fwd.asm["cubin"] and bwd.asm["cubin"]
    assert "atom.global" in fwd.asm["ptx"]  # the last-ticket reductions
    assert "atom.global.add.f" not in fwd.asm["ptx"]  # no float atomics


if INTERPRETED:
    del (test_fake_implementation_gives_the_reference_shapes_and_dtypes_on_meta_tensors,
         test_compile_fullgraph_traces_through_the_dino_ops_into_the_kernels, test_dino_kernels_compile_for_sm90)

    def test_the_meta_compile_and_sm90_checks_pass_in_a_process_without_the_interpreter(compiler):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
             "-k", "meta_tensors or traces or sm90"],
            cwd=Path(__file__).parents[2], env={**os.environ, "TRITON_INTERPRET": "0"},
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert "5 passed" in result.stdout, result.stdout[-3000:]
