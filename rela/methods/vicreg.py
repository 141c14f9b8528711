"""VICReg (Bardes, Ponce and LeCun 2022): an expander on the backbone; invariance (MSE between the views),
variance (a hinge on each dimension's standard deviation) and covariance (off-diagonal covariances
squared) terms. No teacher. torch's elementwise ops and matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.views import BYOL_VIEWS
from rela.methods.base import SslMethod, float32_loss
from rela.models.heads import mlp
from rela.utils.distributed import gather_rows_with_grad


class Vicreg(SslMethod):
    name = "vicreg"
    views = BYOL_VIEWS  # the paper uses BYOL's augmentations
    # ImageNet: the paper's 8192-8192-8192 expander, weights 25 / 25 / 1. Small images: solo-learn's
    # scripts/pretrain/cifar/vicreg.yaml (2048-2048-2048, the same weights).
    defaults = {"imagenet": dict(proj_hidden=8192, proj_dim=8192),
                "cifar10": dict(proj_hidden=2048, proj_dim=2048),
                "cifar100": dict(proj_hidden=2048, proj_dim=2048),
                "*": dict(proj_hidden=512, proj_dim=512)}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int, sim_weight: float, var_weight: float,
                 cov_weight: float):
        super().__init__()
        self.backbone = backbone
        self.weights = (sim_weight, var_weight, cov_weight)
        self.projector = mlp([backbone.feature_dim, proj_hidden, proj_hidden, proj_dim])

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "Vicreg":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim, cfg.vicreg_sim_weight,
                   cfg.vicreg_var_weight, cfg.vicreg_cov_weight)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        return vicreg_loss(z1, z2, *self.weights), features


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_weight: float, var_weight: float, cov_weight: float,
                eps: float = 1e-4) -> torch.Tensor:
    """facebookresearch/vicreg main_vicreg.py's loss: sim * MSE(z1, z2) + var * (v(z1) + v(z2)) / 2
    + cov * (c(z1) + c(z2)), with v(z) = mean_j relu(1 - sqrt(Var z_j + eps)) and c(z) = sum_{i != j}
    Cov(z)_ij^2 / D (unbiased variance and covariance), over every rank's batch (gathered with gradients);
    the MSE over this rank's. The variance term's / 2 is the official code's, not in the paper's formula: the
    paper's weight 25 acts as 12.5 there and here.
    z1, z2: (B, D), any float dtype; computed in float32 with autocast off."""
    with float32_loss(z1.device):
        z1, z2 = z1.float(), z2.float()
        invariance = F.mse_loss(z1, z2)
        z1, z2 = gather_rows_with_grad(z1), gather_rows_with_grad(z2)
        if z1.shape[0] < 2:
            raise ValueError("VICReg's loss needs at least 2 images across ranks: the variance of one image is "
                             "undefined (NaN)")
        return (sim_weight * invariance + var_weight * (_variance(z1, eps) + _variance(z2, eps)) / 2
                + cov_weight * (_covariance(z1) + _covariance(z2)))


def _variance(z: torch.Tensor, eps: float) -> torch.Tensor:
    return F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    n, d = z.shape
    centred = z - z.mean(0)
    cov = centred.T @ centred / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d
