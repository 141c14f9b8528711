"""BYOL: online backbone + projector + predictor, EMA target backbone + projector, symmetric loss."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from rela.models.heads import mlp_head
from rela.ops import byol_loss


class ByolNetworks(nn.Module):
    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp_head(backbone.feature_dim, proj_hidden, proj_dim)
        self.predictor = mlp_head(proj_dim, proj_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in (*self.target_backbone.parameters(), *self.target_projector.parameters()):
            p.requires_grad_(False)

    def online_pair(self) -> nn.Module:
        """The online modules the target mirrors, in the target's structure."""
        return nn.ModuleList([self.backbone, self.projector])

    def target_pair(self) -> nn.Module:
        return nn.ModuleList([self.target_backbone, self.target_projector])


def byol_step(nets: ByolNetworks, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views in one forward. Returns (loss, backbone features (2B, F)) for the online probe."""
    both = torch.cat([view1, view2])
    features = nets.backbone(both)
    predictions = nets.predictor(nets.projector(features))
    with torch.no_grad():
        nets.target_backbone.train(nets.training)
        targets = nets.target_projector(nets.target_backbone(both))
    p1, p2 = predictions.chunk(2)
    z1, z2 = targets.chunk(2)
    return byol_loss(p1, p2, z1, z2, fused=fused), features


def target_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi k / K) + 1) / 2, from base to 1.0."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
