"""MoCo v3 (Chen, Xie and He 2021): a student backbone + projector + predictor, an EMA teacher backbone +
projector, and the symmetric InfoNCE loss of each view's prediction against the teacher's key of the
other view, the other images of the global batch as negatives. torch's matmul and cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.views import BYOL_VIEWS
from rela.methods.base import SslMethod, float32_loss
from rela.models.heads import mlp
from rela.utils.distributed import all_gather_rows, rank_and_world_size


class MocoV3(SslMethod):
    name = "mocov3"
    views = BYOL_VIEWS  # the paper follows BYOL's asymmetric augmentations
    teacher_modules = (("teacher_backbone", "backbone"), ("teacher_projector", "projector"))
    # ImageNet, ResNet-50 (the paper's table / appendix): temperature 1.0 was the ViT's; the ResNet's is
    # 0.2 (moco-v3 README, main_moco.py --moco-t), projector and predictor 4096 -> 256, momentum 0.99
    # with a cosine to 1. Small images: solo-learn's scripts/pretrain/cifar/mocov3.yaml (temperature 0.2,
    # 4096 -> 256, base momentum 0.99).
    defaults = {"imagenet": dict(temperature=0.2, proj_hidden=4096, proj_dim=256, base_momentum=0.99),
                "*": dict(temperature=0.2, base_momentum=0.99)}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int, temperature: float):
        super().__init__()
        self.backbone, self.temperature = backbone, temperature
        # The ResNet variant of the official code: a 2-layer projector ending in a BN without affine, a
        # 2-layer predictor.
        self.projector = mlp([backbone.feature_dim, proj_hidden, proj_dim], last_bn=True, last_bn_affine=False)
        self.predictor = mlp([proj_dim, proj_hidden, proj_dim])
        self.teacher_backbone = self._frozen_copy(backbone)
        self.teacher_projector = self._frozen_copy(self.projector)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "MocoV3":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim, cfg.temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([view1, view2])
        features = self.backbone(both)
        q1, q2 = self.predictor(self.projector(features)).chunk(2)
        k1, k2 = self.teacher_forward(both).chunk(2)
        return (moco_contrastive_loss(q1, k2, self.temperature) + moco_contrastive_loss(q2, k1, self.temperature),
                features)


def moco_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ctr(q, k) (moco-v3 moco/builder.py contrastive_loss): cross-entropy of q's cosine
    similarities to every rank's keys (gathered, no gradient) over the temperature, the positive being the
    key of the same image, times 2 * temperature (the official code's scaling). q: (B, D) with gradient;
    k: (B, D) the teacher's, detached; any float dtype, computed in float32 with autocast off."""
    rank, world = rank_and_world_size()
    if q.shape[0] * world < 2:
        raise ValueError("MoCo v3's loss needs at least 2 images across ranks: with one, its only key is the "
                         "positive (a constant loss, no gradient)")
    with float32_loss(q.device):
        q = F.normalize(q.float(), dim=1)
        keys = all_gather_rows(F.normalize(k.detach().float(), dim=1), [q.shape[0]] * world)
        logits = q @ keys.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return F.cross_entropy(logits, labels) * (2 * temperature)
