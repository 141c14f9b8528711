"""Preemption: a scheduler's SIGTERM or SIGUSR1 (SLURM's `--signal`, Kubernetes, torchrun forwarding its
own SIGTERM) makes the run checkpoint at the next step boundary and exit with EXIT_REQUEUE, so that a
requeued job continues with `--resume auto` and loses at most the step in flight.

During the training loop a signal only sets a flag, read at the next step boundary (every step in one
process; with several ranks at logging steps and epoch ends, where the ranks agree on it in one small
all-reduce, so they stop at the same step). Outside the loop (data, target bank, evaluation) it stops
the run at once: the bank's raw pass resumes where it stopped, and evaluation restarts from the
checkpoint that training left.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from rela.utils import distributed as dist_utils

# sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry": SLURM's and most
# schedulers' requeue hooks can match it, and it is neither a crash (1, a signal's 128+N) nor success.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """The run stopped because a stop signal arrived; `rela.train.main` exits with EXIT_REQUEUE."""


class _State:
    received: str | None = None  # the signal's name, once one arrived
    in_loop = False              # True: defer to the next step boundary; False: stop at once


def _handle(signum, frame) -> None:
    _State.received = signal.Signals(signum).name
    if not _State.in_loop:
        raise StopRequested(f"{_State.received} received outside the training loop; nothing lost: "
                            "resume with --resume auto")


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker's `worker_init_fn`: the worker ignores SIGTERM and SIGUSR1. SLURM and `timeout`
    signal the whole process group; a worker that died of it would take the main process down (the
    DataLoader raises on a dead worker) before it reached the step boundary where it checkpoints. The main
    process stops the workers itself when it exits."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Installs the handlers for the block (main thread only; elsewhere signals keep their handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.received, _State.in_loop = None, False
    previous = {s: signal.signal(s, _handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.in_loop = False


def defer_signals(on: bool) -> None:
    """On in the training loop: a signal waits for the next step boundary. Off: it stops the run at once."""
    _State.in_loop = on


def stop_due(dist: dist_utils.DistInfo, device: torch.device, at_log_step: bool) -> str | None:
    """The signal to stop for at this step boundary, or None. Collective with several ranks (at
    logging steps only): a signal that reached any rank stops all of them at the same step."""
    if not dist.enabled:
        return _State.received
    if not at_log_step:
        return None
    flag = torch.tensor([int(_State.received is not None)], device=device)
    dist_utils.all_reduce_sum_(flag)
    return (_State.received or "a stop signal (on another rank)") if int(flag.item()) else None
