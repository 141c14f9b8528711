"""Everything that trains, in one module for DDP to wrap: the SSL method's networks, RELA's map, the online probe.

forward() runs one step of the phase the loop chose: batch in, (loss, probe loss, probe accuracy, RELA loss) out.
The RELA phase regresses the bank's targets from the method's backbone; the method's phase runs the method's
own step; a blended step of a soft hand-over (rela/methods/handover.py) weighs the two. The learner does not know which method it holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rela.methods.base import SslMethod
from rela.methods.rela import RelaMap, rela_loss_of, rela_step


@dataclass(frozen=True)
class Phase:
    """A phase of training, as the loop chooses it. `name` is what the run logs (metrics.jsonl `phase`) and
    saves (the train state's `phase`): "rela", or the method's name."""
    name: str
    is_rela: bool  # regress the target bank's rows (rela_step); otherwise the method's own step

    @property
    def rela_weight(self) -> float:
        """lambda of a step in this phase without a soft hand-over: 1 in the RELA phase, 0 in the method's."""
        return 1.0 if self.is_rela else 0.0

    @property
    def views(self) -> str:
        """The loader's view mode in this phase (rela/data/views.py names a mode by its phase)."""
        return self.name


RELA_PHASE = Phase("rela", is_rela=True)


def method_phase(method: str) -> Phase:
    """The SSL method's own phase (`method`: its --method name)."""
    return Phase(method, is_rela=False)


def phase_named(name: str) -> Phase:
    """The phase a saved train state's `phase` names."""
    return RELA_PHASE if name == RELA_PHASE.name else method_phase(name)


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
                phase: Phase, fused: bool | None, rela_weight: float):
        """targets: (B, k) rows of the bank where the RELA loss counts, else None. rela_weight: lambda in
        L = lambda L_rela + (1 - lambda) L_method (rela/methods/handover.py; `phase.rela_weight` without a blend).
        Returns (loss, probe loss, probe accuracy, RELA loss): the last detached, None where it was not computed."""
        if rela_weight >= 1.0:
            self.last_step_fn = rela_step.__name__
            loss, features = rela_step(self.method.backbone, self.rela_map, view1, view2, targets, fused=fused)
            rela_loss = loss
        elif rela_weight <= 0.0:
            self.last_step_fn = self.method.step_fn_name
            loss, features = self._method_step(view1, view2, label, fused)
            rela_loss = None
        else:  # a blended step: the method's forward, and W on its online features of the same views
            self.last_step_fn = f"blend_{self.method.step_fn_name}"
            method_loss, features = self._method_step(view1, view2, label, fused)
            rela_loss = rela_loss_of(self.rela_map, features, targets, fused=fused)
            loss = rela_weight * rela_loss + (1.0 - rela_weight) * method_loss
        logits = self.probe(features.detach().float())
        labels = torch.cat([label, label])
        probe_loss = F.cross_entropy(logits, labels)
        probe_accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, probe_loss, probe_accuracy.detach(), None if rela_loss is None else rela_loss.detach()

    def _method_step(self, view1: torch.Tensor, view2: torch.Tensor, label: torch.Tensor, fused: bool | None):
        """The method's (loss, features); a method that learns from labels gets them."""
        if self.method.uses_labels:
            return self.method(view1, view2, fused=fused, labels=label)
        return self.method(view1, view2, fused=fused)
