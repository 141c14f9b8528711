"""A run's checkpoint files: their names (RUN/checkpoints/ckpt-STEP.pt), the newest (intact) one, pruning, and
the background writer. What a checkpoint holds is rela/checkpoint.py's business."""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rela.errors import RelaError
from rela.utils.files import atomic_torch_save, check_archive

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}.pt"


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact_checkpoint(run_dir: Path, warn) -> Path | None:
    """The newest checkpoint whose archive is whole (`check_archive`); each damaged newer one is named
    through `warn(message)` and passed over: a run resumes from the one before rather than not at all.
    None for a folder without checkpoints (a fresh run); RelaError if every one is damaged."""
    found = _checkpoints(run_dir)
    for path in reversed(found):
        try:
            check_archive(path)
            return path
        except RelaError as err:
            warn(f"warning: {err}; trying the checkpoint before it")
    if found:
        raise RelaError(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'}: all {len(found)} are damaged")
    return None


def prune_checkpoints(run_dir: Path, keep: int = 2) -> None:
    """Keeps the newest `keep` checkpoints; removes temporary files that a killed writer left behind."""
    for p in _checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)
    for p in (Path(run_dir) / "checkpoints").glob(".ckpt-*.pt.tmp-*"):
        if p.name.rsplit("-", 1)[1] != str(os.getpid()):
            p.unlink(missing_ok=True)


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time, from snapshots on the CPU: the step that
    asked goes on while the file is serialised, fsynced and renamed, and the old ones pruned. `wait()`
    returns once the last one is on disk, and raises what its write raised."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rela-checkpoint")
        self._pending: Future | None = None
        self.last_submitted = time.time()  # the run's start, before any checkpoint

    def submit(self, state: dict, path: Path, run_dir: Path) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, state, path, run_dir)
        self.last_submitted = time.time()

    @staticmethod
    def _write(state: dict, path: Path, run_dir: Path) -> None:
        previous = latest_checkpoint(run_dir)
        try:
            atomic_torch_save(state, path)
        except OSError as err:  # a full or read-only disk: the run stops; what was on disk stays
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
            raise RelaError(f"cannot write checkpoint {path}: {err.strerror or err} (errno {err.errno}); "
                            f"{kept}") from None
        prune_checkpoints(run_dir)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
