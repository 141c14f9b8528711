"""Supervised learning as the phase after RELA (the reference code has it beside BYOL): a linear classifier on
the backbone, cross-entropy on the labels of both views. No teacher. With --prior none it is the plain
supervised baseline at the same budget, views and schedule."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.views import ViewSpec
from rela.methods.base import SslMethod, float32_loss

# The standard supervised augmentation: a random-resized crop (0.08-1) and a flip; no colour or blur.
SUPERVISED_VIEW = ViewSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


class Supervised(SslMethod):
    name = "supervised"
    views = (SUPERVISED_VIEW, SUPERVISED_VIEW)
    uses_labels = True
    defaults = {}

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg, num_classes: int) -> "Supervised":
        return cls(backbone, num_classes)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """labels: (B,) class indices of the images both views come from. Returns (the mean cross-entropy over
        the 2B views, backbone features (2B, F)); the loss in float32 with autocast off."""
        features = self.backbone(torch.cat([view1, view2]))
        with float32_loss(features.device):
            logits = self.classifier(features.float())
            return F.cross_entropy(logits, torch.cat([labels, labels])), features
