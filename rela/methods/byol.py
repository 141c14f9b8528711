"""BYOL (Grill et al. 2020): online backbone + projector + predictor, an EMA target backbone + projector,
the symmetric negative-cosine loss between the online predictions and the target projections."""
from __future__ import annotations

import math

import torch
from torch import nn

from rela.data.views import BYOL_VIEWS
from rela.methods.base import SslMethod
from rela.models.heads import mlp_head
from rela.ops import byol_loss


class Byol(SslMethod):
    name = "byol"
    views = BYOL_VIEWS  # asymmetric: blur 1.0 / 0.1, solarize 0 / 0.2 (the paper's table 6)
    teacher_modules = (("target_backbone", "backbone"), ("target_projector", "projector"))
    # The dataset presets are BYOL's (rela/config.py PRESETS): nothing of its own to add.
    defaults = {}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(backbone.feature_dim, proj_hidden, proj_dim)
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim)
        self.target_backbone = self._frozen_copy(backbone)
        self.target_projector = self._frozen_copy(self.projector)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "Byol":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views in one forward. Returns (loss, backbone features (2B, F))."""
        both = torch.cat([view1, view2])
        features = self.backbone(both)
        predictions = self.predictor(self.projector(features))
        targets = self.teacher_forward(both)
        p1, p2 = predictions.chunk(2)
        z1, z2 = targets.chunk(2)
        return byol_loss(p1, p2, z1, z2, fused=fused), features


def target_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi k / K) + 1) / 2, from base to 1.0."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
