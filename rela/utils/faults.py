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
restarted group must be able to run on. The variables are read once, when `rela.train.run` starts (`arm`),
and nothing fires outside a run.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaultPlan:
    """The RELA_* variables, read once when a run starts (`arm`), so a hook on the per-step path costs one
    check of a module global; None fields ask for nothing."""
    kill: str | None = None
    sleep: str | None = None
    wait: str | None = None
    fail_write: str | None = None
    nan_at: int | None = None

    @classmethod
    def from_env(cls) -> "FaultPlan | None":
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return None  # a restarted torchrun attempt runs on
        rank = os.environ.get("RELA_KILL_RANK")
        if rank is not None and rank != os.environ.get("RANK", "0"):
            return None
        get = os.environ.get
        plan = cls(get("RELA_KILL_AT"), get("RELA_SLEEP_AT"), get("RELA_WAIT_AT"), get("RELA_FAIL_WRITE"),
                   None if get("RELA_NAN_AT") is None else int(get("RELA_NAN_AT")))
        return None if plan == cls() else plan


_plan: FaultPlan | None = None  # armed by rela.train.run for the run's length; None: no fault anywhere


def arm() -> None:
    """Reads the RELA_* variables for the run that starts now (rela.train.run)."""
    global _plan
    _plan = FaultPlan.from_env()


def disarm() -> None:
    global _plan
    _plan = None


def kill_point(stage: str, where: int | str) -> None:
    """Dies (or sleeps, or waits) here if RELA_KILL_AT (RELA_SLEEP_AT, RELA_WAIT_AT) names this stage and place."""
    plan = _plan
    if plan is None:
        return
    here = f"{stage}:{where}"
    if plan.kill is not None and (plan.kill == here or plan.kill.rsplit(":", 1)[0] == here):
        name = plan.kill[len(here) + 1:] or "SIGKILL"
        os.kill(os.getpid(), getattr(signal, name))
    if plan.sleep is not None and plan.sleep.rsplit(":", 1)[0] == here:
        time.sleep(float(plan.sleep.rsplit(":", 1)[1]))
    if plan.wait is not None and plan.wait.startswith(here + ":"):
        gate, deadline = Path(plan.wait[len(here) + 1:]), time.monotonic() + 900
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def write_fault(path: Path) -> OSError | None:
    """The error RELA_FAIL_WRITE asks a write of `path` to fail with, or None."""
    if _plan is None or _plan.fail_write is None:
        return None
    pattern, name = _plan.fail_write.rsplit(":", 1)
    if not fnmatch.fnmatch(Path(path).name, pattern):
        return None
    code = getattr(errno, name)
    return OSError(code, os.strerror(code), str(path))


def poisoned_lr(step: int, lr: float) -> float:
    """NaN instead of `lr` at the step RELA_NAN_AT names."""
    return float("nan") if _plan is not None and _plan.nan_at == step else lr
