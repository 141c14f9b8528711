"""The optimisers against their formulas: LARS (You et al. 2017, as BYOL uses it), the AdamW weight-decay
split, the warm-up + cosine learning rate and BYOL's target-momentum schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rela.methods.byol import target_momentum
from rela.models.backbones import build_backbone
from rela.models.heads import mlp_head
from rela.optim import build_optimizer, learning_rate

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _net(seed: int = 0) -> nn.Module:
    """Conv, linear and BatchNorm layers, as in the learner; conv weights start at zero (trust ratio 1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
                        nn.BatchNorm1d(5), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.zero_()
    return net


def _excluded_by_module(model: nn.Module) -> set[str]:
    """The rule written independently: biases of any layer and every parameter of a norm layer."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            if param_name == "bias" or isinstance(module, NORM_LAYERS):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def _lars_reference(weights: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], excluded: set[str],
                    lr: float, weight_decay: float, momentum: float, eta: float) -> dict[str, torch.Tensor]:
    """LARS in float64: g <- g + wd w; g <- eta ||w|| / ||g|| * g (1 when a norm is 0); v <- m v + g; w <- w - lr v.
    Excluded parameters skip the first two lines."""
    w = {n: t.double().clone() for n, t in weights.items()}
    v: dict[str, torch.Tensor] = {}
    for step_grads in grads:
        for n, g in step_grads.items():
            g = g.double()
            if n not in excluded:
                g = g + weight_decay * w[n]
                w_norm, g_norm = float(w[n].norm()), float(g.norm())
                g = g * (eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0)
            v[n] = g.clone() if n not in v else momentum * v[n] + g
            w[n] = w[n] - lr * v[n]
    return w


def test_lars_matches_float64_transcription_over_steps():
    net = _net()
    lr, weight_decay = 0.3, 0.05
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=generator) for n, p in net.named_parameters()} for _ in range(4)]
    optimizer = build_optimizer(net.named_parameters(), "lars", lr, weight_decay)
    for step_grads in grads:
        for n, p in net.named_parameters():
            p.grad = step_grads[n].clone()
        optimizer.step()
    expected = _lars_reference(start, grads, _excluded_by_module(net), lr, weight_decay, momentum=0.9, eta=0.001)
    for n, p in net.named_parameters():
        assert not torch.equal(p.detach(), start[n]), n
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_lars_leaves_excluded_parameters_plain_sgd_with_momentum():
    """Biases and norm layers move by lr * g exactly: no decay, no trust ratio (a 1000x difference at eta=1e-3)."""
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = build_optimizer(net.named_parameters(), "lars", lr=0.5, weight_decay=0.1)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for n, p in net.named_parameters():
        if n in _excluded_by_module(net):
            torch.testing.assert_close(p.detach(), before[n] - 0.5, msg=n)


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_weight_decay_only_on_weights_of_conv_and_linear_layers(name):
    model = nn.ModuleDict({"backbone": build_backbone("small_resnet", seed=0), "head": mlp_head(128, 32, 16)})
    optimizer = build_optimizer(model.named_parameters(), name, lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert undecayed == _excluded_by_module(model)
    assert decayed == set(names.values()) - undecayed
    if name == "lars":
        assert all(g["lars_exclude"] == (g["weight_decay"] == 0) for g in optimizer.param_groups)


def test_adamw_decays_exactly_the_decay_group():
    """With zero gradients AdamW's only move is the decoupled decay w <- w (1 - lr wd)."""
    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    optimizer = build_optimizer(net.named_parameters(), "adamw", lr=0.1, weight_decay=0.5)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    excluded = _excluded_by_module(net)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 1.0 if n in excluded else 0.95), msg=n)


class _BroadcastBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 3, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))  # a bias shaped to broadcast over (B, C, H, W)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight) + self.bias


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_bias_is_excluded_by_name_whatever_its_shape(name):
    module = _BroadcastBias()
    optimizer = build_optimizer(module.named_parameters(), name, lr=1e-3, weight_decay=0.1)
    undecayed = [p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(undecayed) == 1 and undecayed[0] is module.bias


def test_frozen_parameters_are_not_optimised():
    net = _net()
    net[0].weight.requires_grad_(False)
    optimizer = build_optimizer(net.named_parameters(), "adamw", lr=1e-3, weight_decay=0.1)
    assert all(p is not net[0].weight for g in optimizer.param_groups for p in g["params"])


@pytest.mark.parametrize("total, warmup", [(100, 10), (1000, 1), (57, 13)])
def test_learning_rate_warms_up_linearly_then_decays_by_cosine(total, warmup):
    peak = 0.4
    assert learning_rate(0, total, warmup, peak) == pytest.approx(peak / warmup)
    assert learning_rate(warmup - 1, total, warmup, peak) == pytest.approx(peak)
    assert learning_rate(warmup, total, warmup, peak) == pytest.approx(peak)  # cosine starts at its peak
    middle = warmup + (total - warmup) / 2
    if middle == int(middle):
        assert learning_rate(int(middle), total, warmup, peak) == pytest.approx(peak / 2)
    for step in range(warmup, total + 1):
        progress = (step - warmup) / (total - warmup)
        assert learning_rate(step, total, warmup, peak) == pytest.approx(peak * (1 + math.cos(math.pi * progress)) / 2)
    assert learning_rate(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(total + 5, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(s, total, warmup, peak) for s in range(total + 1)]
    assert rates[:warmup] == sorted(rates[:warmup]) and rates[warmup:] == sorted(rates[warmup:], reverse=True)


def test_learning_rate_without_warmup_starts_at_peak():
    assert learning_rate(0, 10, 0, 0.2) == pytest.approx(0.2)
    assert learning_rate(5, 10, 0, 0.2) == pytest.approx(0.1)


@pytest.mark.parametrize("base", [0.99, 0.996])
def test_target_momentum_rises_from_base_to_one_by_cosine(base):
    total = 200
    assert target_momentum(0, total, base) == pytest.approx(base)
    assert target_momentum(total // 2, total, base) == pytest.approx((1 + base) / 2)
    assert target_momentum(total, total, base) == pytest.approx(1.0)
    assert target_momentum(total + 10, total, base) == pytest.approx(1.0)
    for step in (1, 37, 150, 199):
        expected = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
        assert target_momentum(step, total, base) == pytest.approx(expected, rel=1e-12)


class _PerParameterLARS(torch.optim.Optimizer):
    """The LARS step as it was before the foreach rewrite: a loop of small kernels per parameter (the reference)."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where((param_norm > 0) & (grad_norm > 0),
                                        group["trust_coefficient"] * param_norm / grad_norm,
                                        torch.ones_like(param_norm))
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def test_foreach_lars_equals_the_per_parameter_lars_over_steps():
    """Same maths as the old loop: trust ratios on the device, zero-norm weights, a parameter without a
    gradient at one step, a changing learning rate; equal to float32 rounding (1e-6 of each tensor's
    largest entry: m v + trust g is rounded once by addcmul, twice by a multiply then an add) after every step."""
    nets = [_net(), _net()]
    for net in nets:
        net[3].bias.requires_grad_(False)  # no gradient: skipped by both
    lr, weight_decay = 0.3, 0.05
    optimizers = [build_optimizer(nets[0].named_parameters(), "lars", lr, weight_decay)]
    groups = [{"params": g["params"], **{k: v for k, v in g.items() if k != "params"}}
              for g in build_optimizer(nets[1].named_parameters(), "lars", lr, weight_decay).param_groups]
    optimizers.append(_PerParameterLARS(groups, lr=lr, weight_decay=weight_decay))
    generator = torch.Generator().manual_seed(2)
    for step in range(6):
        grads = {n: torch.randn(p.shape, generator=generator) for n, p in nets[0].named_parameters()}
        if step == 3:
            grads["5.weight"] = torch.zeros_like(grads["5.weight"])  # zero gradient norm: trust ratio 1
        for net, optimizer in zip(nets, optimizers):
            for n, p in net.named_parameters():
                p.grad = grads[n].clone() if p.requires_grad and not (step == 2 and n == "3.weight") else None
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / 10)
            optimizer.step()
        for (n, fast), slow in zip(nets[0].named_parameters(), nets[1].parameters()):
            torch.testing.assert_close(fast.detach(), slow.detach(), rtol=1e-6, atol=1e-6 * float(slow.detach().abs().max()),
                                       msg=f"{n} at step {step}")
            # The momentum buffers carry the trust ratio undiluted by the weights: the sharper check.
            if fast in optimizers[0].state:
                expected = optimizers[1].state[slow]["momentum_buffer"]
                torch.testing.assert_close(optimizers[0].state[fast]["momentum_buffer"], expected, rtol=1e-6,
                                           atol=1e-6 * float(expected.abs().max()), msg=f"{n}'s momentum at step {step}")
    for n, p in nets[0].named_parameters():
        assert not torch.equal(p.detach(), _net().state_dict()[n]) or not p.requires_grad, n


def test_adamw_is_foreach_off_cuda():
    optimizer = build_optimizer(_net().named_parameters(), "adamw", lr=1e-3, weight_decay=0.1)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


class _RecordOps(TorchDispatchMode):
    """Every aten op a block dispatches (a foreach op once, however many tensors it covers)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[object, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, args))
        return func(*args, **(kwargs or {}))


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """The elements fill a block of memory, each once, in some order of the dimensions."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _on_fast_path(name: str, args: tuple) -> bool:
    """torch's rule for CUDA's multi-tensor kernels, transcribed (ATen's ForeachUtils.h,
    check_fast_path_restrictions): every tensor of every list on one device, of one dtype, strided,
    non-overlapping and dense, and the lists' i-th tensors of equal sizes and of equal strides (but along
    dimensions of size 1). addcmul_/addcdiv_ also take a first factor list of 0-d tensors of that dtype and
    device (ForeachPointwiseOp.cu, torch >= 2.11)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    first = lists[0][0]
    if name.startswith(("_foreach_addcmul", "_foreach_addcdiv")) and len(lists) == 3 \
            and all(t.dim() == 0 for t in lists[1]):
        if any(t.dtype != first.dtype or t.device != first.device for t in lists[1]):
            return False
        lists = [lists[0], lists[2]]
    for tensors in zip(*lists):
        if any(t.dtype != first.dtype or t.device != first.device or t.layout != torch.strided
               or not _non_overlapping_and_dense(t) or t.shape != tensors[0].shape for t in tensors):
            return False
        if any(a != b for t in tensors for size, a, b in zip(t.shape, t.stride(), tensors[0].stride()) if size != 1):
            return False
    return True


def _lars_step_ops(net: nn.Module, steps: int = 3) -> list[_RecordOps]:
    optimizer = build_optimizer(net.named_parameters(), "lars", 0.2, 1e-4)
    generator = torch.Generator().manual_seed(3)
    recorded = []
    for _ in range(steps):
        for p in net.parameters():  # in the parameter's layout, as autograd makes gradients
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))
        with _RecordOps() as ops:
            optimizer.step()
        recorded.append(ops)
    return recorded


def test_lars_step_is_a_few_foreach_ops_on_the_fast_path_and_reads_nothing_back():
    """After the first step (which makes the momentum buffers): every foreach op qualifies for CUDA's
    multi-tensor kernels, the count of ops does not grow with the count of parameters (no per-parameter
    arithmetic), and no value comes back to the host (`.item()`, `float(t)`, `bool(t)`: _local_scalar_dense)."""
    small = _net()
    large = build_backbone("small_resnet", seed=0).to(memory_format=torch.channels_last)  # as on CUDA
    assert sum(1 for _ in large.parameters()) >= 3 * sum(1 for _ in small.parameters())
    counts = []
    for net in (small, large):
        steps = _lars_step_ops(net)
        for ops in steps:
            names = [func.__name__ for func, _ in ops.ops]
            assert not [n for n in names if "local_scalar_dense" in n or n.startswith("item")], names
        for ops in steps[1:]:
            slow = [func.__name__ for func, args in ops.ops
                    if func.__name__.startswith("_foreach") and not _on_fast_path(func.__name__, args)]
            assert not slow, f"foreach ops off the fast path: {slow}"
        counts.append([len(ops.ops) for ops in steps[1:]])
    assert counts[0] == counts[1], f"ops per step grow with the parameters: {counts}"
