"""Everything that trains, in one module for DDP to wrap: BYOL's networks, RELA's map, the online probe.

forward() runs one phase's step: batch in, (method loss, probe loss, probe accuracy) out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.methods.byol import ByolNetworks, byol_step
from rela.methods.rela import RelaMap, rela_step


class Learner(nn.Module):
    def __init__(self, nets: ByolNetworks, rela_map: RelaMap | None, num_classes: int):
        super().__init__()
        self.nets, self.rela_map = nets, rela_map
        # The online probe reads detached features, so it measures the backbone without steering it.
        self.probe = nn.Linear(nets.backbone.feature_dim, num_classes)
        self.last_step_fn: str | None = None  # the step function the last forward ran, for the run's log


    def forward(self, view1: torch.Tensor, view2: torch.Tensor, label: torch.Tensor, targets: torch.Tensor | None,
                phase: str, fused: bool | None):
        if phase == "rela":
            step_fn, (loss, features) = rela_step, rela_step(self.nets.backbone, self.rela_map, view1, view2,
                                                             targets, fused=fused)
        else:
            step_fn, (loss, features) = byol_step, byol_step(self.nets, view1, view2, fused=fused)
        self.last_step_fn = step_fn.__name__
        logits = self.probe(features.detach().float())
        labels = torch.cat([label, label])
        probe_loss = F.cross_entropy(logits, labels)
        probe_accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, probe_loss, probe_accuracy.detach()
