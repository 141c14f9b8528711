"""One optimiser step of the trainer, shared by the training loop and benchmarks/throughput.py."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rela.data.interfaces import TrainBatch
from rela.methods.learner import Learner, Phase
from rela.ops import prepare_ema_
from rela.prior.target_bank import TargetBank


def make_ema_updater(learner: Learner, fused: bool | None) -> Callable[[float], None]:
    """The teacher's EMA step, `update(momentum)` (nothing, for a method without a teacher). Call before
    building the optimiser and DDP: on the fused path the teacher's and the student's parameters become
    views into one flat buffer each (one kernel launch per step)."""
    pair = learner.method.teacher_pair()
    if pair is None:
        return _no_teacher
    teacher, student = pair
    return prepare_ema_(teacher, student, fused=fused).update


def _no_teacher(momentum: float) -> None:
    """The EMA step of a method without a teacher."""


class StepLosses(NamedTuple):
    """One optimiser step's numbers, averaged over its images, on the device. rela_loss: the RELA loss's part
    (the loss itself in a pure RELA step; None where no micro-batch computed it), what the phase controller
    follows through a blended step."""
    loss: torch.Tensor
    probe_loss: torch.Tensor
    probe_accuracy: torch.Tensor
    rela_loss: torch.Tensor | None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Callable[[float], None],
               micro_batches: list[TrainBatch], *, phase: Phase, bank: TargetBank | None, lr: float, momentum: float,
               autocast_dtype: torch.dtype | None, fused: bool | None, rela_weight: float | None = None) -> StepLosses:
    """Forward and backward over the micro-batches (gradients accumulated; DDP syncs on the last), one
    optimiser step, one EMA step, then the method's `after_step`, in `phase` (the loop's choice) with the RELA
    loss weighted by `rela_weight` (None: 1 in the RELA phase, 0 after; the bank's rows are looked up only where
    it is above 0). Nothing here waits for the GPU."""
    if rela_weight is None:
        rela_weight = phase.rela_weight
    for group in optimizer.param_groups:
        group["lr"] = lr
    last = len(micro_batches) - 1
    total = sum(len(b.index) for b in micro_batches)
    step_loss = step_probe_loss = step_probe_accuracy = 0.0
    step_rela_loss = None
    for i, batch in enumerate(micro_batches):
        targets = bank.lookup(batch.index) if rela_weight > 0.0 else None
        no_sync = model.no_sync() if (i < last and isinstance(model, DistributedDataParallel)) else nullcontext()
        with no_sync, torch.autocast(batch.view1.device.type, dtype=autocast_dtype,
                                     enabled=autocast_dtype is not None):
            loss, probe_loss, probe_accuracy, rela_loss = model(batch.view1, batch.view2, batch.label, targets, phase,
                                                                fused, rela_weight)
        weight = len(batch.index) / total  # each image counts once, whatever its micro-batch's size
        ((loss + probe_loss) * weight).backward()
        step_loss = step_loss + loss.detach() * weight
        step_probe_loss = step_probe_loss + probe_loss.detach() * weight
        step_probe_accuracy = step_probe_accuracy + probe_accuracy * weight
        if rela_loss is not None:
            step_rela_loss = rela_loss * weight if step_rela_loss is None else step_rela_loss + rela_loss * weight
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema(momentum)
    learner = model.module if isinstance(model, DistributedDataParallel) else model
    learner.method.after_step()  # once per step, whatever the micro-batches (DINO's centre)
    return StepLosses(step_loss, step_probe_loss, step_probe_accuracy, step_rela_loss)
