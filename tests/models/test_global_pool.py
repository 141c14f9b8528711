"""Backbones pool by a mean over H and W (GlobalAvgPool), not adaptive_avg_pool2d, whose CUDA backward has
no deterministic kernel: same features as the old pooling, and --deterministic training can run on CUDA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rela.models.backbones import BACKBONES, GlobalAvgPool, build_backbone

SIZES = {"small_resnet": 16, "resnet18_cifar": 32, "resnet50_cifar": 32, "resnet18": 64, "resnet50": 64}


def _with_adaptive_pooling(net: nn.Module) -> nn.Module:
    """The backbone as it was built before: nn.AdaptiveAvgPool2d(1) wherever GlobalAvgPool sits now."""
    for name, module in list(net.named_modules()):
        if isinstance(module, GlobalAvgPool):
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], nn.AdaptiveAvgPool2d(1))
    return net


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_backbone_pools_by_mean_not_adaptive_pooling(arch):
    net = build_backbone(arch, seed=0)
    kinds = [type(m) for m in net.modules()]
    assert kinds.count(GlobalAvgPool) == 1
    assert not any(issubclass(k, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for k in kinds)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_features_and_gradients_equal_adaptive_pooling(arch):
    size = SIZES[arch]
    images = torch.randn(3, 3, size, size + 4, generator=torch.Generator().manual_seed(1))
    ours, old = build_backbone(arch, seed=2).eval(), _with_adaptive_pooling(build_backbone(arch, seed=2).eval())
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in old.modules())
    out, ref = ours(images), old(images)
    assert out.shape == ref.shape == (3, ours.feature_dim)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), old.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("size", [1, 3, 7])
def test_global_pool_is_the_spatial_mean(size):
    x = torch.randn(2, 5, size, size + 1, dtype=torch.float64)
    torch.testing.assert_close(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x), rtol=1e-12, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["small_resnet", "resnet18_cifar"])
def test_backward_runs_under_deterministic_algorithms_on_cuda(arch, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by torch at each cuBLAS call
    net = build_backbone(arch, seed=0).cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            net.zero_grad()
            net(images).square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])
