"""What every self-supervised method gives the trainer: `SslMethod`.

A method is one small module (rela/methods/<name>.py) holding its heads, its loss, its teacher (an EMA
copy, where it keeps one), its views and its own state. The training loop knows only this interface:

- `forward(view1, view2, fused=...) -> (loss, features)`: one step's loss on two views of the same
  images, and the online backbone's features of both views, (2B, F), for the online probe.
- `teacher_pair() -> (teacher, student) | None`: the modules the EMA step moves the teacher's weights
  towards (same structure), or None for a method without a teacher (SimCLR, Barlow Twins, VICReg,
  SimSiam). A method with a teacher names its modules in `teacher_modules` and gets `teacher_pair`,
  `backbones` and `teacher_forward` from here.
- `schedule(step, steps_per_epoch)`: the method's own step-indexed settings (DINO's teacher temperature
  warm-up); called before every step, nothing to save (recomputed from the step on resume).
- `after_step()`: called once after each optimiser step, whatever --grad-accum: state that the official
  code updates once per iteration (DINO's centre, from the step's micro-batches together).
- Its state (DINO's centre) lives in registered buffers, so it travels with the learner's state_dict
  into every checkpoint.
- A loss made of torch matmuls runs in float32 with autocast off (`float32_loss`); the fused ops (BYOL's,
  SimSiam's, DINO's) compute in float32 themselves.

The RELA phase is the same for every method: it regresses the bank's targets from `backbone` (see
rela/methods/rela.py), and the EMA step still runs where there is a teacher.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from rela.data.views import ViewSpec


class SslMethod(nn.Module):
    name: ClassVar[str]
    # The pair of views of the method's own phase (the RELA phase has its own, rela/data/views.py).
    views: ClassVar[tuple[ViewSpec, ViewSpec]]
    # Per-preset defaults of the method's own options, over the dataset preset, under the user's flags:
    # {"imagenet": {...}, "cifar10": {...}, ...}; "*" applies to every preset not named.
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    # What --recipe reference sets for this method over its general choices (rela/config.py REFERENCE_RECIPE):
    # the reference code's own heads and loss settings, for the methods it has (BYOL, DINO).
    reference_recipe: ClassVar[dict[str, Any]] = {}

    # A method with an EMA teacher: (teacher, student) attribute names, the backbones first, then the heads
    # the teacher applies in order, e.g. (("teacher_backbone", "backbone"), ("teacher_head", "head")).
    teacher_modules: ClassVar[tuple[tuple[str, str], ...]] = ()
    # A method that learns from labels (supervised): forward() also takes `labels`, (B,), and from_config
    # `num_classes`.
    uses_labels: ClassVar[bool] = False

    backbone: nn.Module

    @property
    def step_fn_name(self) -> str:
        """What the run's log calls this method's step (metrics.jsonl `step_fn`)."""
        return f"{self.name}_step"

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, *, fused: bool | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def teacher_pair(self) -> tuple[nn.Module, nn.Module] | None:
        if not self.teacher_modules:
            return None
        teachers, students = zip(*self.teacher_modules)
        return (nn.ModuleList([getattr(self, name) for name in teachers]),
                nn.ModuleList([getattr(self, name) for name in students]))

    @torch.no_grad()
    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's output for `images`: its backbone, then its heads, in the student's train/eval mode
        (BN on the batch's statistics while training, as the papers' teachers do)."""
        out = images
        for name, _ in self.teacher_modules:
            module = getattr(self, name)
            module.train(self.training)
            out = module(out)
        return out

    def schedule(self, step: int, steps_per_epoch: int) -> None:
        pass

    def after_step(self) -> None:
        pass

    def backbones(self) -> list[nn.Module]:
        """The student's backbone, and the teacher's where there is one: what --compile compiles."""
        return [self.backbone] + [getattr(self, teacher) for teacher, _ in self.teacher_modules[:1]]

    def _frozen_copy(self, module: nn.Module) -> nn.Module:
        """A teacher copy of `module` that no optimiser or gradient touches (the EMA moves it)."""
        teacher = copy.deepcopy(module)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher


def float32_loss(device: torch.device):
    """The context a loss runs in: autocast off. Under the step's bf16 autocast a matmul casts even float32
    inputs to bf16 (8 bits of mantissa: errors of up to about a percent in a (D x D) cross-correlation or a
    (B x B) similarity matrix and their gradients), whatever `.float()` the loss calls first."""
    return torch.autocast(device.type, enabled=False)


def preset_defaults(defaults: dict[str, dict[str, Any]], preset: str) -> dict[str, Any]:
    return dict(defaults.get(preset, defaults.get("*", {})))
