"""Barlow Twins (Zbontar et al. 2021): a projector on the backbone; the cross-correlation matrix of the
two views' batch-standardised projections is pushed to the identity. No teacher. torch's matmul: the
loss is one (D x B) @ (B x D) product and elementwise terms."""
from __future__ import annotations

import torch
from torch import nn

from rela.data.views import BYOL_VIEWS
from rela.methods.base import SslMethod, float32_loss
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
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C = z1n^T z2n / N over the global batch of N = B x
    ranks images, as facebookresearch/barlowtwins main.py computes it: each view standardised per dimension
    with the global batch's mean and biased variance (its BatchNorm1d(affine=False), made a SyncBatchNorm
    under DDP), the product summed over ranks. Every sum over ranks carries its gradient, so after DDP's
    average the gradient is the global loss's (the official all_reduce of C carries none: its gradient is
    1/ranks of this). z1, z2: (B, D), equal B on every rank, any float dtype; computed in float32 with
    autocast off."""
    _, world = rank_and_world_size()
    n = z1.shape[0] * world
    if n < 2:
        raise ValueError("Barlow Twins' loss needs at least 2 images across ranks: one image standardises to "
                         "zeros (a constant loss, no gradient)")
    with float32_loss(z1.device):
        z = torch.stack([z1, z2]).float()  # (2, B, D): both views' statistics in one all-reduce
        mean = all_reduce_sum_with_grad(z.sum(1, keepdim=True)) / n
        centred = z - mean
        variance = all_reduce_sum_with_grad(centred.pow(2).sum(1, keepdim=True)) / n
        z1n, z2n = centred / torch.sqrt(variance + eps)
        c = all_reduce_sum_with_grad(z1n.T @ z2n) / n
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        return on_diag + lambda_offdiag * off_diag
