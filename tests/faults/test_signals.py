"""SIGTERM or SIGUSR1, as a scheduler sends before preemption: a checkpoint at the next step boundary,
exit status 75 (EX_TEMPFAIL), and a requeued `--resume auto` that ends like the uninterrupted run."""
from __future__ import annotations

import pytest

from fault_runs import ARGS, assert_ends_like, train_process
from rela.train import main
from rela.utils.checkpoint_files import latest_checkpoint
from rela.utils.signals import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # subprocess runs: the slow tier (README: Tests)


def test_sigterm_checkpoints_at_the_next_step_and_exits_75_then_resume_ends_like_the_whole_run(tmp_path,
                                                                                             uninterrupted):
    out = tmp_path / "run"
    args = [*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(out), "--resume", "auto"]
    stopped = train_process(*args, faults={"RELA_KILL_AT": "after-step:5:SIGTERM"})
    assert stopped.returncode == EXIT_REQUEUE == 75, stopped.stderr[-3000:]
    assert "rela.train: SIGTERM received: stopped after step 5 with a checkpoint; resume with --resume auto" \
        in stopped.stderr
    assert latest_checkpoint(out).name == "ckpt-000000005.pt"  # step 5 is no checkpoint step: written for the stop
    assert not (out / "summary.json").exists()
    assert main(args) == 0
    assert_ends_like(out, uninterrupted)


def test_sigusr1_outside_the_training_loop_stops_at_once_with_75(tmp_path):
    """In the bank's raw pass (resumable) a signal stops the run at once: no step boundary to wait for."""
    out = tmp_path / "run"
    stopped = train_process(*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(out),
                            faults={"RELA_KILL_AT": "bank-build:128:SIGUSR1"})
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "rela.train: SIGUSR1 received outside the training loop" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert latest_checkpoint(out) is None and list((tmp_path / "banks").glob("raw-*.bank"))
