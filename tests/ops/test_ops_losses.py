"""byol_loss and rela_loss with fused=True: the kernels (in Triton's interpreter) against a float64 reference."""
from __future__ import annotations

import pytest
import torch

from rela.ops import (byol_loss, byol_loss_fused, byol_loss_reference, rela_loss, rela_loss_fused,
                      rela_loss_reference)
from rela.ops.cosine_losses import EPS

# Forward: absolute error of the loss (a sum of means of cosines, so of order 1).
# Gradients: per row, error relative to the row's natural scale 1 / (B * max(|a_i|, eps)).
TOLERANCE = {
    torch.float32: {"loss": 1e-6, "grad": 2e-6},
    torch.bfloat16: {"loss": 1e-6, "grad": 1e-2},
    torch.float16: {"loss": 2e-6, "grad": 4e-3},
}
SHAPES = [(1, 1), (1, 7), (3, 1), (5, 33), (17, 100), (300, 256), (2, 8192), (3, 3000)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def byol_inputs(B, D, dtype, generator, correlated=False):
    p1, p2, z1, z2 = (torch.randn(B, D, generator=generator).to(dtype) for _ in range(4))
    if correlated:  # cosines near 1, losses near 0
        z1, z2 = (p2 + 0.1 * z1).to(dtype), (p1 + 0.1 * z2).to(dtype)
    return [p1.requires_grad_(), p2.requires_grad_()], [z1, z2]


def loss_error(loss, expected) -> float:
    assert loss.dim() == 0
    return (loss.double() - expected.double()).abs().item()


def grad_error(grad, expected, a) -> float:
    """Largest per-row error of `grad`, relative to the row's natural scale; inf for any non-finite."""
    if not torch.isfinite(grad).all():
        return float("inf")
    B = a.shape[0]
    scale = 1.0 / (B * a.double().norm(dim=1).clamp_min(EPS))
    return ((grad.double() - expected).norm(dim=1) / scale).max().item()


def run_byol(preds, targets):
    loss = byol_loss(*preds, *targets, fused=True)
    loss.backward()
    return loss, [p.grad for p in preds]


def reference_byol(preds, targets):
    preds64 = [p.detach().double().requires_grad_() for p in preds]
    loss = byol_loss_reference(*preds64, *(z.double() for z in targets))
    loss.backward()
    return loss, [p.grad for p in preds64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, D", SHAPES)
def test_byol_loss_matches_float64_reference(B, D, dtype, launches, poison):
    generator = torch.Generator().manual_seed(B * 10007 + D)
    preds, targets = byol_inputs(B, D, dtype, generator, correlated=D % 2 == 1)
    expected_loss, expected_grads = reference_byol(preds, targets)

    loss, grads = run_byol(preds, targets)

    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel"]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss_error(loss, expected_loss) <= TOLERANCE[dtype]["loss"]
    for grad, expected, pred in zip(grads, expected_grads, preds):
        assert grad.dtype == dtype
        assert grad_error(grad, expected, pred) <= TOLERANCE[dtype]["grad"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, D", SHAPES)
def test_rela_loss_matches_float64_reference(B, D, dtype, launches, poison):
    generator = torch.Generator().manual_seed(B * 10007 + D + 1)
    y_hat = torch.randn(B, D, generator=generator).to(dtype).requires_grad_()
    y = torch.randn(B, D, generator=generator).to(dtype)
    y_hat64 = y_hat.detach().double().requires_grad_()
    expected = rela_loss_reference(y_hat64, y.double())
    expected.backward()

    loss = rela_loss(y_hat, y, fused=True)
    loss.backward()

    assert launches == ["cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel"]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss_error(loss, expected) <= TOLERANCE[dtype]["loss"]
    assert y_hat.grad.dtype == dtype
    assert grad_error(y_hat.grad, y_hat64.grad, y_hat) <= TOLERANCE[dtype]["grad"]


@pytest.mark.parametrize("B, D", [(3, 5), (4, 1), (2, 17)])
def test_byol_function_passes_gradcheck_in_float64(B, D, launches):
    generator = torch.Generator().manual_seed(D)
    p1, p2, z1, z2 = (torch.randn(B, D, generator=generator, dtype=torch.float64) for _ in range(4))
    p1.requires_grad_()
    p2.requires_grad_()
    assert torch.autograd.gradcheck(byol_loss_fused, (p1, p2, z1, z2), eps=1e-6, atol=1e-7)
    assert "cosine_loss_bwd_kernel" in launches


@pytest.mark.parametrize("B, D", [(3, 5), (2, 17)])
def test_rela_function_passes_gradcheck_in_float64(B, D, launches):
    generator = torch.Generator().manual_seed(D)
    y_hat = torch.randn(B, D, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(B, D, generator=generator, dtype=torch.float64)
    # Non-contiguous too: every other column of a wider tensor.
    y_wide = torch.randn(B, 2 * D, generator=generator, dtype=torch.float64)[:, ::2]
    assert torch.autograd.gradcheck(rela_loss_fused, (y_hat, y), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(rela_loss_fused, (y_hat, y_wide), eps=1e-6, atol=1e-7)
    assert "cosine_loss_bwd_kernel" in launches


def non_contiguous(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as `x` with other strides: transposed storage, a column step, a row step."""
    if kind == "transposed":
        out = x.t().contiguous().t()
    elif kind == "column_step":
        out = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)[:, ::2]
        out.copy_(x)
    else:
        out = torch.zeros(2 * x.shape[0], x.shape[1] + 3, dtype=x.dtype)[::2, 1:-2]
        out.copy_(x)
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


@pytest.mark.parametrize("kind", ["transposed", "column_step", "row_step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_give_the_contiguous_results(kind, dtype, launches, poison):
    generator = torch.Generator().manual_seed(7)
    preds, targets = byol_inputs(9, 37, dtype, generator)
    expected_loss, expected_grads = run_byol(preds, targets)
    expected_grads = [g.clone() for g in expected_grads]
    strided_preds = [non_contiguous(p.detach(), kind).requires_grad_() for p in preds]
    strided_targets = [non_contiguous(z, kind) for z in targets]

    loss, grads = run_byol(strided_preds, strided_targets)

    assert len(launches) == 4
    assert torch.equal(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads):
        assert torch.equal(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_norms_below_eps_follow_cosine_similarity(dtype, launches):
    """Rows of zeros and rows of norm < 1e-8, in either side of a pair, as F.cosine_similarity treats them."""
    generator = torch.Generator().manual_seed(3)
    preds, targets = byol_inputs(6, 10, dtype, generator)
    with torch.no_grad():
        preds[0][0].zero_()
        preds[0][1].mul_(1e-11)
        preds[1][2].mul_(3e-10)
        targets[1][0].zero_()             # pairs with preds[0][0]: both sides zero
        targets[1][3].mul_(1e-12)
        targets[0][4].zero_()
    expected_loss, expected_grads = reference_byol(preds, targets)

    loss, grads = run_byol(preds, targets)

    assert len(launches) == 2
    tol = TOLERANCE.get(dtype, {"loss": 1e-12, "grad": 1e-10})
    assert loss_error(loss, expected_loss) <= tol["loss"]
    for grad, expected, pred in zip(grads, expected_grads, preds):
        assert grad_error(grad, expected, pred) <= tol["grad"]


def test_targets_get_no_gradient(launches):
    generator = torch.Generator().manual_seed(0)
    preds, targets = byol_inputs(4, 8, torch.float32, generator)
    targets = [z.requires_grad_() for z in targets]
    run_byol(preds, targets)
    y = torch.randn(4, 8, requires_grad=True)
    rela_loss(preds[0].detach().requires_grad_(), y, fused=True).backward()
    assert len(launches) == 4
    assert targets[0].grad is None and targets[1].grad is None and y.grad is None


def test_mixed_dtypes_and_upstream_gradient(launches):
    """bf16 predictions against float32 targets; an upstream gradient other than 1 scales the result."""
    generator = torch.Generator().manual_seed(1)
    p1, p2 = (torch.randn(7, 48, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    z1, z2 = (torch.randn(7, 48, generator=generator) for _ in range(2))
    (3.0 * byol_loss(p1, p2, z1, z2, fused=True)).backward()
    p1_64, p2_64 = (p.detach().double().requires_grad_() for p in (p1, p2))
    (3.0 * byol_loss_reference(p1_64, p2_64, z1.double(), z2.double())).backward()
    assert len(launches) == 2
    assert grad_error(p1.grad, p1_64.grad, p1) <= 3 * TOLERANCE[torch.bfloat16]["grad"]
    assert grad_error(p2.grad, p2_64.grad, p2) <= 3 * TOLERANCE[torch.bfloat16]["grad"]
    assert p1.grad.dtype == torch.bfloat16


def test_repeated_launches_agree_to_the_bit(launches, poison):
    """The reduction's ticket counter is reset by each launch, and the partials are added in one order."""
    generator = torch.Generator().manual_seed(2)
    preds, targets = byol_inputs(300, 64, torch.float32, generator)
    losses = [byol_loss(*preds, *targets, fused=True).detach() for _ in range(3)]
    assert len(launches) == 3
    assert torch.isfinite(losses[0])
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[1], losses[2])


def test_bad_shapes_raise():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="p2"):
        byol_loss(a, torch.randn(4, 9), a, a)
    with pytest.raises(ValueError, match="y"):
        rela_loss(a, torch.randn(8))
    with pytest.raises(ValueError, match="B, D >= 1"):
        rela_loss(torch.randn(0, 8), torch.randn(0, 8))
