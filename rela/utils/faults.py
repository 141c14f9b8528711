"""Fault injection for the tests that prove nothing is lost when a process dies, a disk fills or a loss
turns to NaN. Every hook reads one environment variable; unset (always, outside tests) each costs one
dictionary lookup.

- RELA_KILL_AT=STAGE:WHERE[:SIGNAL]: the process sends itself SIGNAL (default SIGKILL, as a node failure
  or the OOM killer: no handler runs, no file is closed; SIGTERM or SIGUSR1 as a scheduler before
  preemption) when it reaches STAGE at WHERE. Stages: `bank-build` (WHERE: rows encoded so far),
  `after-step` (the step just taken), `hand-over` (the step at which the RELA phase ended), `write`
  (WHERE: the name of a file being written atomically, after its bytes are on disk and before the
  rename, e.g. write:ckpt-000000008.pt), `evaluate` (the final step, between feature extraction and
  the probes).
- RELA_SLEEP_AT=STAGE:WHERE:SECONDS: waits there instead (tests of concurrent runs).
- RELA_WAIT_AT=STAGE:WHERE:PATH: waits there until the file PATH exists, a gate the test opens when it is
  ready (tests of concurrent runs that must not depend on how fast a loaded machine is; 15 minutes at most).
- RELA_KILL_RANK=R: the two above fire on rank R only (RANK, as torchrun sets it; default every rank).
- RELA_FAIL_WRITE=PATTERN:ERRNO: an atomic write of a file whose name matches PATTERN (fnmatch) raises
  OSError(ERRNO), e.g. ENOSPC or EROFS, after half its bytes are written, as a full disk would.
- RELA_NAN_AT=STEP: the learning rate of step STEP (counted from 0) is NaN, so the weights and every
  later loss are NaN, as in a run that diverged.

Under torchrun, faults fire in the first attempt only (TORCHELASTIC_RESTART_COUNT 0 or unset): the
restarted group must be able to run on.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal
import time
from pathlib import Path


def _armed() -> bool:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    rank = os.environ.get("RELA_KILL_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def kill_point(stage: str, where: int | str) -> None:
    """Dies (or sleeps) here if RELA_KILL_AT (RELA_SLEEP_AT) names this stage and place."""
    kill, sleep, wait = (os.environ.get(name) for name in ("RELA_KILL_AT", "RELA_SLEEP_AT", "RELA_WAIT_AT"))
    if kill is None and sleep is None and wait is None:
        return
    here = f"{stage}:{where}"
    if kill is not None and (kill == here or kill.rsplit(":", 1)[0] == here) and _armed():
        name = kill[len(here) + 1:] or "SIGKILL"
        os.kill(os.getpid(), getattr(signal, name))
    if sleep is not None and sleep.rsplit(":", 1)[0] == here and _armed():
        time.sleep(float(sleep.rsplit(":", 1)[1]))
    if wait is not None and wait.startswith(here + ":") and _armed():
        gate, deadline = Path(wait[len(here) + 1:]), time.monotonic() + 900
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def write_fault(path: Path) -> OSError | None:
    """The error RELA_FAIL_WRITE asks a write of `path` to fail with, or None."""
    spec = os.environ.get("RELA_FAIL_WRITE")
    if spec is None:
        return None
    pattern, name = spec.rsplit(":", 1)
    if not fnmatch.fnmatch(Path(path).name, pattern) or not _armed():
        return None
    code = getattr(errno, name)
    return OSError(code, os.strerror(code), str(path))


def poisoned_lr(step: int, lr: float) -> float:
    """NaN instead of `lr` at the step RELA_NAN_AT names."""
    at = os.environ.get("RELA_NAN_AT")
    return float("nan") if at is not None and int(at) == step and _armed() else lr
