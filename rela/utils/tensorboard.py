"""--logger tensorboard: every metrics.jsonl row as TensorBoard scalars, under RUN/tensorboard/ (rank 0 only).

Tags group what a reader compares: `loss/rela` and `loss/byol` (the loss of the phase that ran), `rela/rho`
and `rela/threshold` (the adaptive rule), `rela/switch_step` (logged once, at the hand-over), `schedule/lr`,
`schedule/momentum`, `speed/images_per_s`, `speed/data_wait_fraction`, `online_probe/*`, and the kNN monitor
twice: `monitor/knn_top1` against the step, and `monitor/knn_top1_vs_wall_clock_s` whose step is the run's
wall-clock in whole seconds (bank and monitor included), so TensorBoard's step axis reads as time. Every
event's wall time is the run's start plus that clock, so the "Relative" axis shows the same. A numeric field
not listed here goes under `metrics/NAME`: nothing in metrics.jsonl is left out.
"""
from __future__ import annotations

import time
from pathlib import Path

from rela.errors import RelaError

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # torch.utils.tensorboard imports the tensorboard package
    SummaryWriter = None

# metrics.jsonl field -> tag; "loss" is split by phase, the monitor's accuracy is logged twice (see above).
TAGS = {
    "probe_loss": "online_probe/loss", "online_probe_top1": "online_probe/top1",
    "rho": "rela/rho", "rela_threshold": "rela/threshold", "rela_phase_end_step": "rela/switch_step",
    "rela_weight": "rela/weight", "rela_loss": "rela/loss_part",
    "lr": "schedule/lr", "momentum": "schedule/momentum",
    "images_per_s": "speed/images_per_s", "data_wait_fraction": "speed/data_wait_fraction",
    "monitor_knn_top1": "monitor/knn_top1", "wall_clock_s": "monitor/wall_clock_s",
    "training_clock_s": "monitor/training_clock_s",
}
NOT_SCALARS = {"step", "epoch"}  # the x-axis, and what epoch a step is in (in metrics.jsonl)


def require_tensorboard() -> None:
    if SummaryWriter is None:
        raise RelaError("--logger tensorboard needs the tensorboard package: pip install 'rela[tensorboard]' "
                        "(or pip install tensorboard)")


class TensorBoardSink:
    """Writes rows as scalars; opened at the first row, so that a resume can first hide the rows logged after
    its checkpoint (TensorBoard's purge_step), as metrics.jsonl drops them."""

    def __init__(self, log_dir: Path, start_time: float):
        require_tensorboard()
        self.log_dir, self.start_time = Path(log_dir), start_time
        self.writer = None
        self.purge_step: int | None = None

    def purge_after(self, step: int) -> None:
        self.close()
        self.purge_step = step + 1

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        step = int(record.get("step", 0))
        clock = record.get("wall_clock_s")
        walltime = self.start_time + clock if isinstance(clock, (int, float)) else time.time()
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = f"loss/{record.get('phase', 'unknown')}" if key == "loss" else TAGS.get(key, f"metrics/{key}")
            self.writer.add_scalar(tag, value, step, walltime=walltime)
            if key == "monitor_knn_top1" and isinstance(clock, (int, float)):
                self.writer.add_scalar("monitor/knn_top1_vs_wall_clock_s", value, round(clock), walltime=walltime)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
