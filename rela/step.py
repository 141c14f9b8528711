"""One optimiser step of the trainer, shared by the training loop and benchmarks/throughput.py."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ema: Callable[[float], None],
               micro_batches: list[TrainBatch], *, phase: Phase, bank: TargetBank | None, lr: float, momentum: float,
               autocast_dtype: torch.dtype | None, fused: bool | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward over the micro-batches (gradients accumulated; DDP syncs on the last), one
    optimiser step, one EMA step, then the method's `after_step`, in `phase` (the loop's choice; the bank's
    rows are looked up only in the RELA phase). Returns the step's (loss, probe loss, probe accuracy), averaged
    over its images, on the device: nothing here waits for the GPU."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    last = len(micro_batches) - 1
    total = sum(len(b.index) for b in micro_batches)
    step_loss = step_probe_loss = step_probe_accuracy = 0.0
    for i, batch in enumerate(micro_batches):
        targets = bank.lookup(batch.index) if phase.is_rela else None
        no_sync = model.no_sync() if (i < last and isinstance(model, DistributedDataParallel)) else nullcontext()
        with no_sync, torch.autocast(batch.view1.device.type, dtype=autocast_dtype,
                                     enabled=autocast_dtype is not None):
            loss, probe_loss, probe_accuracy = model(batch.view1, batch.view2, batch.label, targets, phase, fused)
        weight = len(batch.index) / total  # each image counts once, whatever its micro-batch's size
        ((loss + probe_loss) * weight).backward()
        step_loss = step_loss + loss.detach() * weight
        step_probe_loss = step_probe_loss + probe_loss.detach() * weight
        step_probe_accuracy = step_probe_accuracy + probe_accuracy * weight
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema(momentum)
    learner = model.module if isinstance(model, DistributedDataParallel) else model
    learner.method.after_step()  # once per step, whatever the micro-batches (DINO's centre)
    return step_loss, step_probe_loss, step_probe_accuracy

