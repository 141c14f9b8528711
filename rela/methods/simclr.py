"""SimCLR (Chen et al. 2020): a projector on the backbone and the NT-Xent (InfoNCE) loss over both views,
every other image of the global batch a negative. No teacher. torch's matmul and cross-entropy, not a
fused kernel: the loss is a (2B x 2B) matmul and a softmax, which cuBLAS and torch already do well
(README: Fused ops)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.views import ViewSpec
from rela.methods.base import SslMethod, float32_loss
from rela.models.heads import mlp
from rela.utils.distributed import gather_rows_with_grad, rank_and_world_size

# The paper's augmentations (appendix A): crop 0.08-1, flip, colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2)
# with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 on both views; symmetric.
SIMCLR_VIEW = ViewSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_p=0.5, solarize_p=0.0)


class SimClr(SslMethod):
    name = "simclr"
    views = (SIMCLR_VIEW, SIMCLR_VIEW)
    # ImageNet: the paper's temperature 0.1 and 2048-2048-128 projector. Small images: solo-learn's
    # scripts/pretrain/cifar/simclr.yaml (temperature 0.2, projector 2048 -> 256).
    defaults = {"imagenet": dict(temperature=0.1, proj_hidden=2048, proj_dim=128),
                "cifar10": dict(temperature=0.2, proj_hidden=2048, proj_dim=256),
                "cifar100": dict(temperature=0.2, proj_hidden=2048, proj_dim=256),
                "*": dict(temperature=0.2)}

    def __init__(self, backbone: nn.Module, proj_hidden: int, proj_dim: int, temperature: float):
        super().__init__()
        self.backbone, self.temperature = backbone, temperature
        self.projector = mlp([backbone.feature_dim, proj_hidden, proj_dim])

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "SimClr":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim, cfg.temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(torch.cat([view1, view2]))
        z1, z2 = self.projector(features).chunk(2)
        return nt_xent_loss(z1, z2, self.temperature), features


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss (the paper's eq. 1 averaged over the 2N views, as lightly and solo-learn have it; the
    official TF code's loss_a + loss_b is twice this): the mean over this rank's 2B rows of -log softmax of
    the positive (the other view of the same image) among the 2BW - 1 other rows of the global batch
    (every rank's, gathered with their gradient), on cosine similarities divided by the temperature.
    z1, z2: (B, D), this rank's views, any float dtype; computed in float32 with autocast off."""
    rank, world = rank_and_world_size()
    batch = z1.shape[0]
    if batch * world < 2:
        raise ValueError("SimCLR's loss needs at least 2 images across ranks: with one, its only candidate is "
                         "the positive (a constant loss, no gradient)")
    with float32_loss(z1.device):
        queries = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        keys = torch.cat([gather_rows_with_grad(F.normalize(z.float(), dim=1)) for z in (z1, z2)])  # (2BW, D)
        logits = queries @ keys.T / temperature
        local = torch.arange(batch, device=z1.device) + rank * batch
        self_index = torch.cat([local, local + world * batch])
        positive = torch.cat([local + world * batch, local])
        logits = logits.masked_fill(F.one_hot(self_index, keys.shape[0]).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)
