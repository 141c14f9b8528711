"""SimSiam (Chen and He 2021): a projector and a predictor on the backbone, the symmetric negative cosine of
each view's prediction against the other view's projection under a stop-gradient. No teacher: the
stop-gradient replaces BYOL's EMA. The loss is BYOL's fused negative cosine, rescaled."""
from __future__ import annotations

import torch
from torch import nn

from rela.data.views import ViewSpec
from rela.methods.base import SslMethod
from rela.models.heads import mlp
from rela.ops import byol_loss

# The paper's augmentations (following MoCo v2): crop 0.2-1, flip, jitter (0.4, 0.4, 0.4, 0.1) p 0.8,
# grayscale p 0.2, blur p 0.5; symmetric, no solarize.
SIMSIAM_VIEW = ViewSpec(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.5,
                        solarize_p=0.0)


class SimSiam(SslMethod):
    name = "simsiam"
    views = (SIMSIAM_VIEW, SIMSIAM_VIEW)
    # ImageNet: the paper's 3-layer 2048 projector and 512 bottleneck predictor (proj_dim // 4). Small images:
    # solo-learn's scripts/pretrain/cifar/simsiam.yaml (proj_hidden 2048, proj_output 2048, pred_hidden 512).
    defaults = {"imagenet": dict(proj_hidden=2048, proj_dim=2048),
                "cifar10": dict(proj_hidden=2048, proj_dim=2048),
                "cifar100": dict(proj_hidden=2048, proj_dim=2048),
                "*": dict(proj_hidden=512, proj_dim=512)}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        # Every projector layer has BN, the output's without an affine part (the official code).
        self.projector = mlp([backbone.feature_dim, proj_hidden, proj_hidden, proj_dim], last_bn=True,
                             last_bn_affine=False)
        self.predictor = mlp([proj_dim, max(proj_dim // 4, 1), proj_dim])

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "SimSiam":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(torch.cat([view1, view2]))
        z = self.projector(features)
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        return simsiam_loss(p1, p2, z1, z2, fused=fused), features


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
                 fused: bool | None) -> torch.Tensor:
    """-(mean cos(p1, sg(z2)) + mean cos(p2, sg(z1))) / 2. byol_loss is 2 - (the two mean cosines), with z
    detached, so this is byol_loss / 2 - 1: the same fused kernel."""
    return byol_loss(p1, p2, z1, z2, fused=fused) / 2 - 1
