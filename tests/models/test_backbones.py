"""Every registered backbone at the image size its presets use: (B, feature_dim) out, seeded builds; heads."""
from __future__ import annotations

import pytest
import torch

from rela.errors import RelaError
from rela.models.backbones import BACKBONES, build_backbone
from rela.models.heads import mlp_head

# Architecture -> (image size of its presets, pooled feature width).
SIZES = {"small_resnet": (16, 128), "resnet18_cifar": (32, 512), "resnet50_cifar": (32, 2048),
         "resnet18": (64, 512), "resnet50": (64, 2048)}


def test_every_registered_architecture_is_covered():
    assert set(SIZES) == set(BACKBONES)


@pytest.mark.parametrize("arch", sorted(SIZES))
def test_output_is_batch_by_feature_dim(arch):
    size, width = SIZES[arch]
    net = build_backbone(arch, seed=0)
    assert net.feature_dim == width
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        train_out = net.train()(images)
        eval_out = net.eval()(images)
    for out in (train_out, eval_out):
        assert out.shape == (2, width) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", sorted(SIZES))
def test_seed_fixes_the_weights(arch):
    first, again, other = (build_backbone(arch, seed=s).state_dict() for s in (3, 3, 4))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[n], again[n]) for n in first)
    weights = [n for n, t in first.items() if t.is_floating_point() and t.ndim >= 2]
    assert all(not torch.equal(first[n], other[n]) for n in weights)


def test_seeded_build_leaves_the_global_generator_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_backbone("small_resnet", seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(RelaError, match="small_resnet"):
        build_backbone("resnet9000")


@pytest.mark.parametrize("batch, in_dim, hidden, out", [(2, 128, 64, 32), (5, 512, 4096, 256), (3, 7, 1, 1)])
def test_mlp_head_shapes(batch, in_dim, hidden, out):
    head = mlp_head(in_dim, hidden, out)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[1].num_features) == (in_dim, hidden, hidden)
    assert (head[3].in_features, head[3].out_features) == (hidden, out)
    assert head(torch.randn(batch, in_dim)).shape == (batch, out)
