"""Barlow Twins (Zbontar et al. 2021): a projector on the backbone; the cross-correlation matrix of the
two views' batch-standardised projections is pushed to the identity. No teacher. torch's matmul: the
loss is one (D x B) @ (B x D) product and elementwise terms."""
from __future__ import annotations

import torch
from torch import nn

from rela.data.views import BYOL_VIEWS
from rela.methods.base import SslMethod
from rela.models.heads import mlp
from rela.utils.distributed import all_reduce_sum_with_grad, rank_and_world_size


class BarlowTwins(SslMethod):
    name = "barlowtwins"
    views = BYOL_VIEWS  # the paper uses BYOL's augmentations
    # ImageNet: the paper's 8192-8192-8192 projector and lambda 0.0051 (the official code's value).
    # Small images: solo-learn's scripts/pretrain/cifar/barlow.yaml (2048-2048-2048, lambda 0.0051).
    defaults = {"imagenet": dict(proj_hidden=8192, proj_dim=8192, barlow_lambda=0.0051),
                "cifar10": dict(proj_hidden=2048, proj_dim=2048, barlow_lambda=0.0051),
                "cifar100": dict(proj_hidden=2048, proj_dim=2048, barlow_lambda=0.0051),
                "*": dict(proj_hidden=512, proj_dim=512, barlow_lambda=0.0051)}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int, lambda_offdiag: float):
        super().__init__()
        self.backbone, self.lambda_offdiag = backbone, lambda_offdiag
        self.projector = mlp([backbone.feature_dim, proj_hidden, proj_hidden, proj_dim])

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "BarlowTwins":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim, cfg.barlow_lambda)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        return barlow_twins_loss(z1, z2, self.lambda_offdiag), features


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float, eps: float = 1e-5) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C = z1n^T z2n / N: each view's projections
    standardised per dimension over this rank's batch (as a BatchNorm without affine does), the product
    summed over every rank's batch (N = B x ranks). z1, z2: (B, D)."""
    _, world = rank_and_world_size()
    z1n, z2n = (_standardise(z.float(), eps) for z in (z1, z2))
    c = all_reduce_sum_with_grad(z1n.T @ z2n) / (z1.shape[0] * world)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)
