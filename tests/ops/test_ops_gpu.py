"""The fused ops compiled for the GPU, against their references on the GPU (skipped without CUDA).

Shapes 1, odd, 8193 wide, 70,000 x 256, a non-contiguous slice; float32 and bf16; repeated launches on a
side stream; the EMA bit-exact against torch._foreach_lerp_ on a ResNet-50 pair; torch.library.opcheck
with every check (the fake-tensor and AOT checks cannot run under the interpreter, see
test_ops_custom.py); torch.compile(fullgraph=True) through the custom ops, equal to eager.
"""
from __future__ import annotations

import copy

import pytest
import torch

from rela.ops import (byol_loss, byol_loss_reference, dino_loss, dino_loss_reference, ema_update_reference_,
                      prepare_ema_, rela_loss, rela_loss_reference)
from rela.ops.cosine_losses import EPS

pytestmark = pytest.mark.gpu

# Loss: absolute error (the loss is of order 1). Gradients: per row, relative to 1 / (B * max(|a_i|, eps)).
TOLERANCE = {torch.float32: {"loss": 1e-5, "grad": 1e-5}, torch.bfloat16: {"loss": 1e-5, "grad": 1e-2}}
SHAPES = [(1, 1), (7, 33), (3, 8193), (70_000, 256)]


def _inputs(B, D, dtype, seed, layout="contiguous"):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "slice":  # every other row and a column window of a wider tensor
        full = [torch.randn(2 * B, D + 9, generator=generator, device="cuda").to(dtype) for _ in range(4)]
        tensors = [t[::2, 3:3 + D] for t in full]
        assert not tensors[0].is_contiguous()
    else:
        tensors = [torch.randn(B, D, generator=generator, device="cuda").to(dtype) for _ in range(4)]
    return [t.requires_grad_(i < 2) for i, t in enumerate(tensors)]


def _grad_error(grad, expected, a) -> float:
    if not torch.isfinite(grad).all():
        return float("inf")
    scale = 1.0 / (a.shape[0] * a.double().norm(dim=1).clamp_min(EPS))
    return ((grad.double() - expected).norm(dim=1) / scale).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, D, layout", [(*s, "contiguous") for s in SHAPES] + [(513, 65, "slice")])
def test_losses_match_the_float64_reference_on_the_gpu(B, D, layout, dtype):
    p1, p2, z1, z2 = _inputs(B, D, dtype, seed=B + D, layout=layout)
    tol = TOLERANCE[dtype]
    loss = byol_loss(p1, p2, z1, z2)  # auto: the kernels on CUDA tensors
    grads = torch.autograd.grad(loss, (p1, p2))
    d = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate((p1, p2, z1, z2))]
    expected = byol_loss_reference(*d)
    expected_grads = torch.autograd.grad(expected, d[:2])
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) <= tol["loss"]
    for grad, expected_grad, a in zip(grads, expected_grads, (p1, p2)):
        assert grad.dtype == dtype and grad.shape == a.shape
        assert _grad_error(grad, expected_grad, a) <= tol["grad"]
    loss = rela_loss(p1, z1)
    (grad,) = torch.autograd.grad(loss, p1)
    expected = rela_loss_reference(d[0], d[2])
    assert abs(loss.item() - expected.item()) <= tol["loss"]
    assert _grad_error(grad, torch.autograd.grad(expected, d[0])[0], p1) <= tol["grad"]


def test_repeated_launches_on_a_side_stream_agree_to_the_bit():
    p1, p2, z1, z2 = _inputs(4099, 257, torch.float32, seed=3)
    first = byol_loss(p1, p2, z1, z2).detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        losses = [byol_loss(p1, p2, z1, z2).detach() for _ in range(50)]
        grads = [torch.autograd.grad(rela_loss(p1, z1), p1)[0] for _ in range(5)]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(loss, first) for loss in losses)
    assert all(torch.equal(grad, grads[0]) for grad in grads)
    assert torch.equal(byol_loss(p1, p2, z1, z2).detach(), first)  # the default stream's counter is still sane


# DINO: loss relative to max(1, |loss|); teacher_mean relative to max|t|; gradients relative to their natural
# scale 0.5 / (B * student_temp).
DINO_TOLERANCE = {torch.float32: {"loss": 1e-5, "mean": 1e-6, "grad": 5e-5},
                  torch.bfloat16: {"loss": 1e-5, "mean": 1e-6, "grad": 5e-3}}
DINO_TEMPS = (0.1, 0.04)  # DINO's student and teacher temperatures


def _dino_inputs(B, K, dtype, seed, layout="contiguous"):
    tensors = _inputs(B, K, dtype, seed, layout)
    center = 0.3 * torch.randn(K, generator=torch.Generator(device="cuda").manual_seed(seed), device="cuda")
    if layout == "slice":
        center = torch.stack([center, center], dim=1)[:, 1]  # stride 2
    return tensors, center


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, K, layout", [(1, 1, "contiguous"), (7, 4099, "contiguous"), (256, 65_536, "contiguous"),
                                          (33, 1_000, "contiguous"), (130, 4_097, "slice")])
def test_dino_loss_matches_the_float64_reference_on_the_gpu(B, K, layout, dtype):
    (s1, s2, t1, t2), center = _dino_inputs(B, K, dtype, seed=B + K, layout=layout)
    tol = DINO_TOLERANCE[dtype]
    loss, teacher_mean = dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS)  # auto: the kernels on CUDA tensors
    grads = torch.autograd.grad(loss, (s1, s2))
    d = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate((s1, s2, t1, t2))]
    expected, expected_mean = dino_loss_reference(*d, center.double(), *DINO_TEMPS)
    expected_grads = torch.autograd.grad(expected, d[:2])
    assert loss.dtype == teacher_mean.dtype == torch.float32 and teacher_mean.shape == (K,)
    assert abs(loss.item() - expected.item()) <= tol["loss"] * max(1.0, abs(expected.item()))
    t_scale = max(t1.abs().max().item(), t2.abs().max().item())
    assert (teacher_mean.double() - expected_mean).abs().max().item() <= tol["mean"] * t_scale
    grad_scale = 0.5 / (B * DINO_TEMPS[0])
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype and grad.shape == (B, K) and torch.isfinite(grad).all()
        assert (grad.double() - expected_grad).abs().max().item() <= tol["grad"] * grad_scale


def test_dino_loss_repeated_launches_on_a_side_stream_agree_to_the_bit():
    (s1, s2, t1, t2), center = _dino_inputs(256, 65_536, torch.bfloat16, seed=6)
    first_loss, first_mean = (x.detach() for x in dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS))
    first_grads = torch.autograd.grad(dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS)[0], (s1, s2))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        results = [dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS) for _ in range(20)]
        grads = torch.autograd.grad(results[-1][0], (s1, s2))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(loss, first_loss) and torch.equal(mean, first_mean) for loss, mean in results)
    assert all(torch.equal(g, e) for g, e in zip(grads, first_grads))
    assert torch.equal(dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS)[0].detach(), first_loss)


def test_ema_on_a_resnet50_pair_is_bit_exact_against_foreach():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    online = torchvision.models.resnet50().cuda()
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for b in online.buffers():
            b.add_(1) if b.is_floating_point() else b.add_(3)
    ref_target, ref_online = copy.deepcopy(target), copy.deepcopy(online)
    pair = prepare_ema_(target, online)
    assert pair.fused
    for step, momentum in enumerate([0.996, 0.9, torch.tensor(0.99, device="cuda"), 0.3]):
        pair.update(momentum)
        ema_update_reference_(ref_target, ref_online, momentum)
        for (name, got), expected in zip(target.state_dict().items(), ref_target.state_dict().values()):
            assert torch.equal(got, expected), f"{name} at step {step}"


def _op_cases():
    p1, p2, z1, z2 = _inputs(37, 130, torch.float32, seed=4)
    counter, eps = torch.zeros(1, dtype=torch.int32, device="cuda"), torch.full((), EPS, device="cuda")
    _, stats = torch.ops.rela.byol_loss_fwd(p1, p2, z1, z2, counter, eps)
    _, rela_stats = torch.ops.rela.rela_loss_fwd(p1, z1, counter, eps)
    one = torch.ones((), device="cuda")
    target, online = torch.randn(8192, device="cuda"), torch.randn(8192, device="cuda")
    return {
        "byol_loss_fwd": (p1, p2, z1, z2, counter, eps),
        "byol_loss_bwd": (p1, p2, z1, z2, stats.detach(), one),
        "rela_loss_fwd": (p1, z1, counter, eps),
        "rela_loss_bwd": (p1, z1, rela_stats.detach(), one),
        "ema_lerp_": (target, online, torch.tensor(0.99, device="cuda"), 0.0),
        **_dino_op_cases(),
    }


def _dino_op_cases():
    from rela.kernels.dino_loss import num_tickets

    (s1, s2, t1, t2), center = _dino_inputs(37, 1030, torch.bfloat16, seed=8)
    temps = torch.tensor([1 / DINO_TEMPS[0], 1 / DINO_TEMPS[1]], device="cuda")
    counters = torch.zeros(num_tickets(37, 1030, s1.device), dtype=torch.int32, device="cuda")
    _, _, lse = torch.ops.rela.dino_loss_fwd(s1, s2, t1, t2, center, temps, counters)
    return {"dino_loss_fwd": (s1, s2, t1, t2, center, temps, counters),
            "dino_loss_bwd": (s1, s2, t1, t2, center, temps, lse.detach(), torch.ones((), device="cuda"))}


@pytest.mark.parametrize("name", ["byol_loss_fwd", "byol_loss_bwd", "rela_loss_fwd", "rela_loss_bwd", "ema_lerp_",
                                  "dino_loss_fwd", "dino_loss_bwd"])
def test_custom_ops_pass_every_opcheck_on_the_gpu(name):
    torch.library.opcheck(getattr(torch.ops.rela, name), _op_cases()[name])


def test_compile_fullgraph_through_the_ops_equals_eager():
    def step(p1, p2, z1, z2):
        return byol_loss(p1, p2, z1, z2) + 0.5 * rela_loss(p1, z2)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    p1, p2, z1, z2 = _inputs(256, 256, torch.bfloat16, seed=5)
    loss = step(p1, p2, z1, z2)
    grads = torch.autograd.grad(loss, (p1, p2))
    compiled_loss = compiled(p1, p2, z1, z2)
    compiled_grads = torch.autograd.grad(compiled_loss, (p1, p2))
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    for got, expected in zip(compiled_grads, grads):
        torch.testing.assert_close(got, expected)

    target, online = torch.nn.Linear(64, 32).cuda(), torch.nn.Linear(64, 32).cuda()
    reference = copy.deepcopy(target)
    pair = prepare_ema_(target, online)
    t, o = pair.target_flat, pair.online_flat
    # The op itself (EmaPair.update checks data pointers first, which torch.compile does not trace).
    compiled_update = torch.compile(lambda m: torch.ops.rela.ema_lerp_(t.params, o.params, m, 0.0), fullgraph=True)
    momentum = torch.tensor(0.9, device="cuda")
    compiled_update(momentum)
    ema_update_reference_(reference, online, momentum)
    for got, expected in zip(target.parameters(), reference.parameters()):
        assert torch.equal(got, expected)


def test_compile_fullgraph_through_the_dino_ops_equals_eager():
    def step(s1, s2, t1, t2, center):
        loss, teacher_mean = dino_loss(s1, s2, t1, t2, center, *DINO_TEMPS)
        return loss, 0.9 * center + 0.1 * teacher_mean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    (s1, s2, t1, t2), center = _dino_inputs(64, 4099, torch.bfloat16, seed=9)
    loss, new_center = step(s1, s2, t1, t2, center)
    grads = torch.autograd.grad(loss, (s1, s2))
    compiled_loss, compiled_center = compiled(s1, s2, t1, t2, center)
    compiled_grads = torch.autograd.grad(compiled_loss, (s1, s2))
    assert not compiled_center.requires_grad
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_center, new_center)
    for got, expected in zip(compiled_grads, grads):
        torch.testing.assert_close(got, expected)
