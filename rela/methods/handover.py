"""How the RELA loss hands over to the SSL method's: lambda in L = lambda L_rela + (1 - lambda) L_method.

- linear (the default, with --handover-teacher-reset): the RELA phase ends as the rule says (plateau or
  fraction); then lambda falls from 1 to 0 over N = --handover-steps method steps: 1 - (k + 1) / (N + 1) at the
  k-th (k = 0, 1, ...), so N steps are blended.
- hard (the reference's): lambda is 1 in the RELA phase and 0 from the hand-over on.
- rho: lambda follows the controller's rho in the RELA phase: 1 while rho < r0 (--handover-rho-start), then
  (threshold - rho) / (threshold - r0), down to 0 where rho reaches --rela-threshold and the rule ends the
  phase; 0 from the hand-over on. rho is read from host memory a step late (`PhaseController.rho_before`),
  so no step waits for the device.

Both losses are computed only on blended steps (0 < lambda < 1): the method's forward, and W applied to its
online features of the same two views (no second backbone pass). A blended step runs the method's views
after the hand-over, and RELA's views within the RELA phase (rho).
"""
from __future__ import annotations

import torch
from torch import nn


def linear_weight(steps_since_hand_over: int, handover_steps: int) -> float:
    """lambda at the k-th method step after the hand-over (k = steps_since_hand_over, 0 for the first)."""
    return max(0.0, 1.0 - (steps_since_hand_over + 1) / (handover_steps + 1))


def rho_weight(rho: float, rho_start: float, threshold: float) -> float:
    """lambda in the RELA phase for the controller's rho: 1 up to rho_start, 0 from threshold, linear between."""
    return min(1.0, max(0.0, (threshold - rho) / (threshold - rho_start)))


def handover_steps_for(handover_steps: int | None, total_steps: int) -> int:
    """--handover-steps, or a tenth of the run's optimiser steps (at least 1)."""
    return handover_steps if handover_steps is not None else max(1, round(0.1 * total_steps))


@torch.no_grad()
def reset_teacher_(pair: tuple[nn.Module, nn.Module] | None) -> None:
    """The EMA teacher takes the student's weights and buffers (--handover-teacher-reset), in place: on the fused
    EMA path the teacher's tensors are views into its flat buffers, which must stay the ones the EMA moves."""
    if pair is None:
        return
    teacher, student = pair
    for mine, theirs in zip(teacher.parameters(), student.parameters(), strict=True):
        mine.copy_(theirs)
    for mine, theirs in zip(teacher.buffers(), student.buffers(), strict=True):
        mine.copy_(theirs)
