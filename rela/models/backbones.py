"""Backbones by name. Each returns a module mapping (B, 3, H, W) images to pooled features (B, width)
and has the attribute `feature_dim`. Besides the names of BACKBONES, `timm:NAME` builds a model of timm's."""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
import torchvision

from rela.errors import RelaError


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1), the mean over H and W: what nn.AdaptiveAvgPool2d(1) computes, but its
    backward is an ordinary reduction, while adaptive_avg_pool2d's CUDA backward has no deterministic
    kernel (torch.use_deterministic_algorithms(True), i.e. --deterministic, raises on it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


def _torchvision_resnet(name: str, cifar_stem: bool) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        # CIFAR variant: 3x3 stride-1 stem and no max-pool keep 32 px images at useful resolution.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.avgpool = GlobalAvgPool()  # torchvision's forward flattens after it, as after AdaptiveAvgPool2d(1)
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class _ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A three-stage residual net (32-64-128 channels) for small images such as the 16 px digits."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        self.stages = nn.Sequential(_ResidualBlock(widths[0], widths[0], 1),
                                    _ResidualBlock(widths[0], widths[1], 2),
                                    _ResidualBlock(widths[1], widths[2], 2))
        self.pool = GlobalAvgPool()
        self.feature_dim = widths[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)


BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: _torchvision_resnet("resnet18", cifar_stem=False),
    "resnet50": lambda: _torchvision_resnet("resnet50", cifar_stem=False),
    "resnet18_cifar": lambda: _torchvision_resnet("resnet18", cifar_stem=True),
    "resnet50_cifar": lambda: _torchvision_resnet("resnet50", cifar_stem=True),
    "small_resnet": SmallResNet,
}


def build_backbone(name: str, seed: int | None = None) -> nn.Module:
    """A freshly initialised backbone; with `seed`, initialised from that seed alone (the rand prior).
    `timm:NAME` is any model of timm's zoo, without its classifier (see timm_model)."""
    if name.startswith("timm:"):
        make = functools.partial(timm_model, name.removeprefix("timm:"), what=f"--arch {name}")
    elif name in BACKBONES:
        make = BACKBONES[name]
    else:
        raise RelaError(f"unknown architecture {name!r}; choose one of {', '.join(BACKBONES)} or timm:NAME")
    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def timm_model(name: str, what: str) -> nn.Module:
    """timm's `name`, randomly initialised (nothing is downloaded), returning pooled features: num_classes=0
    removes the classifier, and `feature_dim` is timm's num_features. A ViT's input size is fixed when it
    is built (timm's img_size, 224 for *_224 models): train it at that --image-size."""
    try:
        import timm
    except ImportError:
        raise RelaError(f"{what} needs the timm package: pip install 'rela[timm]' (or pip install timm)") from None
    if not timm.is_model(name):
        raise RelaError(f"{what}: timm has no model {name!r} (timm.list_models('*PATTERN*') lists them)")
    net = timm.create_model(name, pretrained=False, num_classes=0)
    net.feature_dim = net.num_features
    return net
