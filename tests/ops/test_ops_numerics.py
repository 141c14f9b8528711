"""Numerics the loss kernels share with torch beyond the float64 tolerances: NaN and infinity go where the
references send them, bf16 outputs round to nearest even (also in Triton's interpreter, which truncates on
its own), and the DINO teacher mean is exact over many row blocks.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from rela.kernels import INTERPRETED
from rela.kernels.casts import cast_rne
from rela.ops import byol_loss, dino_loss, rela_loss
from test_ops_dino import STUDENT_TEMP, TEACHER_TEMP, dino_launches, inputs, transcription  # noqa: F401 (a fixture)

NAN, INF = math.nan, math.inf
# numpy, which runs the interpreted kernels, warns of every NaN and overflow these tests make on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


def nan_pattern(t: torch.Tensor) -> torch.Tensor:
    return torch.isnan(t)


def same_value(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Both NaN, both the same infinity, or finite and close."""
    got, expected = got.double(), expected.double()
    if math.isnan(expected.item()) or math.isinf(expected.item()):
        return torch.equal(got.isnan(), expected.isnan()) and (got.isnan().item() or got.item() == expected.item())
    return abs(got.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))


# --- NaN and infinity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rela_loss_propagates_nan_and_inf_as_the_reference(side, value, dtype, launches, poison):
    """One poisoned element in row 1: the loss is NaN and row 1's gradient is NaN throughout, as
    F.cosine_similarity gives (its clamp_min keeps a NaN norm); the other rows' gradients stay finite."""
    generator = torch.Generator().manual_seed(5)
    a, b = (torch.randn(4, 9, generator=generator).to(dtype) for _ in range(2))
    (a if side == "a" else b)[1, 4] = value
    grads, losses = [], []
    for fused in (True, False):
        x = a.clone().requires_grad_()
        loss = rela_loss(x, b, fused=fused)
        loss.backward()
        grads.append(x.grad)
        losses.append(loss)

    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel"]
    assert same_value(losses[0], losses[1]) and losses[1].isnan()
    assert torch.equal(nan_pattern(grads[0]), nan_pattern(grads[1]))
    assert nan_pattern(grads[0])[1].all() and torch.isfinite(grads[0][[0, 2, 3]]).all()


def test_byol_loss_nan_in_one_prediction_row_reaches_only_that_row(launches):
    generator = torch.Generator().manual_seed(6)
    p1, p2, z1, z2 = (torch.randn(5, 16, generator=generator) for _ in range(4))
    p2[3, 0] = NAN
    results = []
    for fused in (True, False):
        preds = [p.clone().requires_grad_() for p in (p1, p2)]
        loss = byol_loss(*preds, z1, z2, fused=fused)
        loss.backward()
        results.append((loss, [p.grad for p in preds]))

    (loss, grads), (expected_loss, expected_grads) = results
    assert loss.isnan() and expected_loss.isnan()
    for grad, expected in zip(grads, expected_grads):
        assert torch.equal(nan_pattern(grad), nan_pattern(expected))
    assert nan_pattern(grads[1])[3].all() and nan_pattern(grads[1]).sum() == 16 and not nan_pattern(grads[0]).any()


# (B, K) of 20 x 1500: two row blocks and three column chunks in the interpreter, so a NaN meets the merges
# of the per-chunk softmax statistics and of the column sums.
@pytest.mark.parametrize("where", ["s1", "t2", "center"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_dino_loss_propagates_nan_and_inf_as_the_reference(where, value, dino_launches, poison):
    """A NaN or infinite logit (row 17, column 1100, in the third column chunk) gives the reference's loss
    (NaN, +inf or finite), its NaN pattern in both gradients and its infinities and NaN in the teacher mean."""
    s1, s2, t1, t2, center = inputs(20, 1500, torch.float32, seed=9)
    s1, t2 = s1.detach().clone(), t2.clone()
    if where == "center":
        center[1100] = value
    else:
        {"s1": s1, "t2": t2}[where][17, 1100] = value
    results = []
    for fused in (True, False):
        students = [s1.clone().requires_grad_(), s2.detach().clone().requires_grad_()]
        loss, teacher_mean = dino_loss(*students, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=fused)
        loss.backward()
        results.append((loss, teacher_mean, [s.grad for s in students]))

    (loss, mean, grads), (expected_loss, expected_mean, expected_grads) = results
    assert dino_launches == ["dino_loss_fwd_kernel", "dino_loss_bwd_kernel"]
    assert same_value(loss, expected_loss), (loss, expected_loss)
    assert torch.equal(nan_pattern(mean), nan_pattern(expected_mean))
    assert torch.equal(mean.isinf(), expected_mean.isinf())
    for grad, expected in zip(grads, expected_grads):
        assert torch.equal(nan_pattern(grad), nan_pattern(expected))


# --- bf16 rounding -----------------------------------------------------------------------------------------

@triton.jit
def _store_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, cast_rne(tl.load(x_ptr + offs, mask=mask), out_ptr.dtype.element_ty), mask=mask)


def float32_bits_worth_testing(generator) -> torch.Tensor:
    """Random bit patterns (every sign, exponent, subnormal, infinity, NaN), exact ties between two bf16
    values with an even and an odd lower neighbour, one bit either side of a tie, and the edges."""
    random = torch.randint(-2**31, 2**31, (1 << 16,), generator=generator, dtype=torch.int64)
    high = torch.randint(0, 1 << 16, (1 << 12,), generator=generator, dtype=torch.int64) << 16
    near_ties = torch.cat([high | 0x8000, high | 0x7FFF, high | 0x8001, high | 0xFFFF, high | 0x0001])
    edges = torch.tensor([0x00000000, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x7F800000,
                          0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x00008000, 0x00018000,
                          0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000], dtype=torch.int64)
    bits = torch.cat([random, near_ties, edges])
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("source", [torch.float32, torch.float64], ids=str)
def test_cast_rne_rounds_to_bf16_as_torch_does_to_the_bit(source):
    assert INTERPRETED, "run with TRITON_INTERPRET=1"
    x = float32_bits_worth_testing(torch.Generator().manual_seed(0)).to(source)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _store_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)

    expected = x.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_cast_rne_leaves_float16_and_float32_to_torch():
    assert INTERPRETED, "run with TRITON_INTERPRET=1"
    x = float32_bits_worth_testing(torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.float32):
        out = torch.empty(x.shape, dtype=dtype)
        _store_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
        expected = x.to(dtype)
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out[~expected.isnan()], expected[~expected.isnan()])


def bf16_ulps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between got and expected (both bf16): bit patterns mapped monotonically."""
    def ordered(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(got) - ordered(expected)).abs()


@pytest.mark.parametrize("B, D", [(5, 33), (64, 512)])
def test_bf16_cosine_gradients_round_to_nearest_even(B, D, launches, poison):
    """bf16 gradients are the kernel's float32 gradients rounded by torch, to the bit, and within one bf16 ulp
    of the float64 reference rounded to bf16."""
    generator = torch.Generator().manual_seed(B + D)
    p1, p2, z1, z2 = (torch.randn(B, D, generator=generator).bfloat16() for _ in range(4))
    grads = {}
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        preds = [p.to(dtype).clone().requires_grad_() for p in (p1, p2)]
        byol_loss(*preds, z1.to(dtype), z2.to(dtype), fused=dtype != torch.float64).backward()
        grads[dtype] = [p.grad for p in preds]

    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel"] * 2
    for bf16, fp32, fp64 in zip(grads[torch.bfloat16], grads[torch.float32], grads[torch.float64]):
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16.view(torch.int16), fp32.to(torch.bfloat16).view(torch.int16))
        assert bf16_ulps(bf16, fp64.to(torch.bfloat16)).max() <= 1


@pytest.mark.parametrize("B, K", [(3, 1000), (20, 1500)])
def test_bf16_dino_gradients_round_to_nearest_even(B, K, dino_launches, poison):
    """As for the cosine: bit-exact against the float32 kernel rounded by torch, one ulp from float64."""
    s1, s2, t1, t2, center = inputs(B, K, torch.bfloat16, seed=B * K)
    runs = {}
    for dtype in (torch.bfloat16, torch.float32):
        students = [s.detach().to(dtype).requires_grad_() for s in (s1, s2)]
        loss, _ = dino_loss(*students, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=True)
        runs[dtype] = torch.autograd.grad(loss, students)
    _, _, expected = transcription(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP)

    assert len(dino_launches) == 4
    for bf16, fp32, fp64 in zip(runs[torch.bfloat16], runs[torch.float32], expected):
        assert bf16.dtype == torch.bfloat16
        assert torch.equal(bf16.view(torch.int16), fp32.to(torch.bfloat16).view(torch.int16))
        assert bf16_ulps(bf16, fp64.to(torch.bfloat16)).max() <= 1


# --- DINO teacher mean over many row blocks ----------------------------------------------------------------

def test_dino_teacher_mean_over_many_row_blocks_matches_float64(dino_launches, poison):
    """592 rows are 37 row blocks of 16: the last program of each column chunk adds them a tile of 16 row
    blocks at a time (three steps, the last one masked); the mean is the float64 one within float32 rounding."""
    s1, s2, t1, t2, center = inputs(592, 1000, torch.float32, seed=4)
    _, teacher_mean = dino_loss(s1, s2, t1, t2, center, STUDENT_TEMP, TEACHER_TEMP, fused=True)
    expected = (t1.double().sum(0) + t2.double().sum(0)) / (2 * 592)

    assert len(dino_launches) == 1
    # Each of the 2 * 592 terms is below 5 in size: a float32 sum of them errs by well under 1e-6 here.
    assert (teacher_mean.double() - expected).abs().max().item() <= 1e-6
