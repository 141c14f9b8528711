"""Projection and prediction heads: Linear-BN-ReLU blocks, then a Linear."""
from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's two-layer head: Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def mlp(dims: list[int], *, last_bn: bool = False, last_bn_affine: bool = True, bias: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU for every layer but the last, which is Linear (then BN when `last_bn`, without an affine
    part when not `last_bn_affine`, as SimSiam's, MoCo v3's and Barlow Twins' projectors end).
    dims: [in, hidden..., out]."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=bias and not (last and last_bn)))
        if not last:
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine))
    return nn.Sequential(*layers)
