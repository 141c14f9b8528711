"""A NaN or inf loss stops the run before its weights reach a checkpoint.

The check costs no host sync per step: each step adds `!isfinite(loss)` to a counter on the device and
keeps the first bad step and its loss there (torch.where, no branch). The host reads the counter where
it syncs anyway: at logging steps, before every checkpoint and at the end of training. So a checkpoint
is only written after a check that every loss since the run's start was finite; a run that diverges
stops with the first bad step and its loss named, and its last checkpoint holds finite weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rela.errors import RelaError
from rela.utils import distributed as dist_utils
from rela.utils.checkpoint_files import latest_checkpoint


class NonFiniteLossGuard:
    def __init__(self, device: torch.device):
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """After the optimiser step numbered `step` (1-based, as logged) with this rank's `loss`."""
        loss = loss.detach().float().reshape(())
        bad = ~torch.isfinite(loss)
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss, self.first_loss)
        self.bad_steps += bad

    def check(self, dist: dist_utils.DistInfo, run_dir: Path) -> None:
        """RelaError naming the first non-finite loss (any rank's), if there was one. Collective."""
        total = dist_utils.all_reduce_sum_(self.bad_steps.clone())
        if int(total.item()) == 0:
            return
        found = [(s, l) for s, l in dist_utils.gather_objects((int(self.first_step.item()),
                                                               float(self.first_loss.item())), dist) if s >= 0]
        step, loss = min(found)
        last_checkpoint = latest_checkpoint(run_dir)
        kept = (f"the last checkpoint, {last_checkpoint}, holds finite weights" if last_checkpoint is not None
                else "no checkpoint was written")
        raise RelaError(f"the loss is {loss} at step {step} (non-finite at {int(total.item())} step(s) so far): "
                        f"stopped without checkpointing those weights; {kept}")
