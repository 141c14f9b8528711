"""DINO (Caron et al. 2021): self-distillation with no labels. A student backbone + head and an EMA teacher
backbone + head; the teacher's centred, sharpened softmax is the target of the student's softmax on the
other view. Two global crops (multi-crop is not implemented). The centre is the method's own state: a
buffer, so it is saved with the learner in every checkpoint. It moves once per optimiser step (as the
official code's, once per iteration), by the mean over all of the step's micro-batches under --grad-accum.
The loss is a fused Triton kernel on CUDA (rela.ops.dino_loss: memory-bound at K = 65,536, one pass over the
logits forward and one backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.data.views import ViewSpec
from rela.methods.base import SslMethod
from rela.ops import dino_loss
from rela.utils.distributed import all_reduce_sum_

# Global crops as BYOL's views (DINO's DataAugmentationDINO: blur 1.0 / 0.1, solarize 0 / 0.2, jitter
# (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2). Crop scale 0.14-1: main_dino.py's advice for two global
# crops without local ones (its 0.4-1 default assumes multi-crop).
DINO_VIEWS = (ViewSpec(crop_scale=(0.14, 1.0), blur_p=1.0, solarize_p=0.0),
              ViewSpec(crop_scale=(0.14, 1.0), blur_p=0.1, solarize_p=0.2))


class DinoHead(nn.Module):
    """DINO's head: an MLP of `layers` linear layers (GELU between them, BatchNorm after each hidden one if
    `batch_norm`) to a bottleneck, L2-normalised, then a weight-normalised linear layer to K prototypes
    without bias (its weight norm fixed at 1: the paper's norm_last_layer). The paper's head has 3 layers
    and no BatchNorm; the reference code's (LINs-lab/ReLA methods/dino.py) has 2 with BatchNorm."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, *, layers: int = 3,
                 batch_norm: bool = False):
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        modules: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:])):
            linear = nn.Linear(width_in, width_out)
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
            modules.append(linear)
            if i < layers - 1:
                modules += [nn.BatchNorm1d(width_out), nn.GELU()] if batch_norm else [nn.GELU()]
        self.mlp = nn.Sequential(*modules)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(features), dim=-1)
        return x @ F.normalize(self.prototypes, dim=-1).T.to(x.dtype)


# The reference code (LINs-lab/ReLA methods/dino.py): a 2-layer head d -> 2048 (BN, GELU) -> 256 before 2,048
# prototypes, lightly's DINOLoss defaults (teacher temperature 0.04 throughout, student 0.1, centre 0.9),
# lightly's DINOTransform without local crops (global crop scale 0.4-1). Its momentum (0.99, fixed) and
# optimiser are rela/config.py REFERENCE_RECIPE's.
REFERENCE_DINO = dict(dino_head_layers=2, dino_head_bn=True, proj_hidden=2048, proj_dim=256, dino_out_dim=2048,
                      dino_teacher_temp=0.04, dino_warmup_teacher_temp=0.04, byol_crop_min_scale=0.4)
# The CPU-sized presets (digits, mnist5k) take the reference code's head and loss settings and its fixed
# teacher momentum: there (batch 32, a few hundred steps) the paper's settings sit on a uniform output for
# ~1,400 steps, and four of these together (BN in the head, teacher 0.04 throughout, fixed momentum, crops
# 0.4-1) leave it within 150 (tests/methods/test_methods_learn.py).
SMALL_PRESET_DINO = dict(REFERENCE_DINO, dino_warmup_teacher_epochs=2, base_momentum=0.99, momentum_schedule="constant")


class Dino(SslMethod):
    name = "dino"
    views = DINO_VIEWS
    teacher_modules = (("teacher_backbone", "backbone"), ("teacher_head", "head"))
    # ImageNet: the paper's head (2048 hidden, 256 bottleneck, K = 65,536), student temperature 0.1, teacher
    # 0.04 -> 0.07 over 30 epochs, centre momentum 0.9, teacher momentum 0.996 -> 1. Small images: solo-learn's
    # scripts/pretrain/cifar/dino.yaml (K = 4,096, teacher 0.04 -> 0.07 over the first 5% of its 1,000
    # epochs, base momentum 0.9995); other image folders at K = 1,024 and a 10% warm-up.
    defaults = {"imagenet": dict(proj_hidden=2048, proj_dim=256, dino_out_dim=65536, dino_warmup_teacher_epochs=30,
                                 base_momentum=0.996),
                "cifar10": dict(proj_hidden=2048, proj_dim=256, dino_out_dim=4096, dino_warmup_teacher_epochs=10,
                                base_momentum=0.9995),
                "cifar100": dict(proj_hidden=2048, proj_dim=256, dino_out_dim=4096, dino_warmup_teacher_epochs=10,
                                 base_momentum=0.9995),
                "digits": SMALL_PRESET_DINO, "mnist5k": SMALL_PRESET_DINO,
                "*": dict(dino_out_dim=1024, dino_warmup_teacher_epochs=2, base_momentum=0.99)}
    reference_recipe = REFERENCE_DINO

    def __init__(self, backbone: nn.Module, hidden_dim: int, bottleneck_dim: int, out_dim: int, *,
                 student_temp: float, teacher_temp: float, warmup_teacher_temp: float, warmup_teacher_epochs: float,
                 center_momentum: float, head_layers: int = 3, head_batch_norm: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = DinoHead(backbone.feature_dim, hidden_dim, bottleneck_dim, out_dim, layers=head_layers,
                             batch_norm=head_batch_norm)
        self.teacher_backbone = self._frozen_copy(backbone)
        self.teacher_head = self._frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(out_dim))
        self.student_temp, self.final_teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_epochs = warmup_teacher_temp, warmup_teacher_epochs
        self.center_momentum = center_momentum
        self.teacher_temp = teacher_temperature(0, warmup_teacher_temp, teacher_temp, warmup_teacher_epochs)
        # This step's teacher logits summed over its micro-batches so far (this rank's), and their row count.
        self._teacher_sum: torch.Tensor | None = None
        self._teacher_rows = 0

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg) -> "Dino":
        return cls(backbone, cfg.proj_hidden or 2 * backbone.feature_dim, cfg.proj_dim, cfg.dino_out_dim,
                   student_temp=cfg.dino_student_temp, teacher_temp=cfg.dino_teacher_temp,
                   warmup_teacher_temp=cfg.dino_warmup_teacher_temp,
                   warmup_teacher_epochs=cfg.dino_warmup_teacher_epochs, center_momentum=cfg.dino_center_momentum,
                   head_layers=cfg.dino_head_layers, head_batch_norm=cfg.dino_head_bn)

    def schedule(self, step: int, steps_per_epoch: int) -> None:
        self.teacher_temp = teacher_temperature(step // max(steps_per_epoch, 1), self.warmup_teacher_temp,
                                                self.final_teacher_temp, self.warmup_teacher_epochs)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([view1, view2])
        features = self.backbone(both)
        s1, s2 = self.head(features).chunk(2)
        t1, t2 = self.teacher_forward(both).chunk(2)
        loss, teacher_mean = dino_loss(s1, s2, t1, t2, self.center, self.student_temp, self.teacher_temp, fused=fused)
        if self.training:  # the teacher's sum over this micro-batch, for the centre's update after the step
            teacher_sum = teacher_mean.detach().to(self.center.dtype) * t1.shape[0] * 2
            self._teacher_sum = teacher_sum if self._teacher_sum is None else self._teacher_sum + teacher_sum
            self._teacher_rows += t1.shape[0] * 2
        return loss, features

    @torch.no_grad()
    def after_step(self) -> None:
        """centre <- m centre + (1 - m) mean of the teacher's logits over the step's images on every rank
        (main_dino.py DINOLoss.update_center, once per iteration). One all-reduce of the sum and the count."""
        if self._teacher_sum is None:  # no DINO forward in this step (the RELA phase)
            return
        total = all_reduce_sum_(torch.cat([self._teacher_sum, self._teacher_sum.new_tensor([self._teacher_rows])]))
        self.center.mul_(self.center_momentum).add_(total[:-1] / total[-1], alpha=1 - self.center_momentum)
        self._teacher_sum, self._teacher_rows = None, 0


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: float) -> float:
    """main_dino.py's teacher temperature at `epoch`: np.linspace(warmup_temp, final_temp, warmup_epochs) over
    the first warmup_epochs epochs, then final_temp; so the final value from epoch warmup_epochs - 1 on, and
    a 1-epoch warm-up holds warmup_temp through epoch 0. A fractional warm-up interpolates between the whole
    ones: linear in the epoch with slope 1 / (warmup_epochs - 1), clipped at the final value."""
    if epoch >= warmup_epochs:
        return final_temp
    fraction = min(epoch / (warmup_epochs - 1), 1.0) if warmup_epochs > 1 else 0.0
    return warmup_temp + fraction * (final_temp - warmup_temp)
