"""Everything that trains, in one module for DDP to wrap: the SSL method's networks, RELA's map, the online probe.

forward() runs one phase's step: batch in, (phase loss, probe loss, probe accuracy) out. The phase is
"rela" (regress the bank's targets from the method's backbone) or the method's own; the learner does
not know which method it holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela.methods.base import SslMethod
from rela.methods.rela import RelaMap, rela_step


class Learner(nn.Module):
    def __init__(self, method: SslMethod, rela_map: RelaMap | None, num_classes: int):
        super().__init__()
        self.method, self.rela_map = method, rela_map
        # The online probe reads detached features, so it measures the backbone without steering it.
        self.probe = nn.Linear(method.backbone.feature_dim, num_classes)
        self.last_step_fn: str | None = None  # the step function the last forward ran, for the run's log

    @property
    def backbone(self) -> nn.Module:
        return self.method.backbone

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, label: torch.Tensor, targets: torch.Tensor | None,
                phase: str, fused: bool | None):
        if phase == "rela":
            self.last_step_fn = rela_step.__name__
            loss, features = rela_step(self.method.backbone, self.rela_map, view1, view2, targets, fused=fused)
        else:
            self.last_step_fn = self.method.step_fn_name
            loss, features = self.method(view1, view2, fused=fused)
        logits = self.probe(features.detach().float())
        labels = torch.cat([label, label])
        probe_loss = F.cross_entropy(logits, labels)
        probe_accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, probe_loss, probe_accuracy.detach()
