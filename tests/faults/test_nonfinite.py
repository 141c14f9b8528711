"""A NaN loss stops the run naming the step and the loss; no checkpoint holds the weights it produced."""
from __future__ import annotations

import math

import torch

from fault_runs import ARGS
from rela.train import main
from rela.checkpoint import load_checkpoint
from rela.utils.checkpoint_files import latest_checkpoint


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path, uninterrupted,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    # Step 6 (index 5) runs with a NaN learning rate: its loss is finite, the weights after it are not, and
    # step 7's loss is the first NaN. Checkpoints are due at 4 and 8; the check before step 8's stops the run.
    monkeypatch.setenv("RELA_NAN_AT", "5")
    assert main([*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"rela.train: error: the loss is nan at step 7 (non-finite at 2 step(s) so far): stopped without "
            f"checkpointing those weights; the last checkpoint, {out / 'checkpoints' / 'ckpt-000000004.pt'}, "
            "holds finite weights") in err, err[-3000:]
    assert latest_checkpoint(out).name == "ckpt-000000004.pt"
    saved = load_checkpoint(latest_checkpoint(out))
    assert all(torch.isfinite(t).all() for t in saved["learner"].values() if t.is_floating_point())
    assert not (out / "summary.json").exists()


def test_stop_after_steps_does_not_checkpoint_non_finite_weights(tmp_path, uninterrupted, monkeypatch, capsys):
    """--stop-after-steps 7: step 7 is neither a logging nor a checkpoint step, and its loss is the first NaN.
    The stop's checkpoint comes after the guard's check like every other one."""
    out = tmp_path / "run"
    monkeypatch.setenv("RELA_NAN_AT", "5")
    assert main([*ARGS, "--bank-dir", str(uninterrupted.parent / "banks"), "--out", str(out),
                 "--stop-after-steps", "7"]) == 1
    err = capsys.readouterr().err
    assert "rela.train: error: the loss is nan at step 7" in err, err[-3000:]
    assert latest_checkpoint(out).name == "ckpt-000000004.pt"


def test_fault_variables_are_read_once_when_a_run_starts(monkeypatch):
    """The hooks on the per-step path read a plan made when the run starts, not the environment at every call;
    outside a run nothing fires."""
    from rela.utils import faults

    monkeypatch.setenv("RELA_NAN_AT", "3")
    assert faults.poisoned_lr(3, 0.1) == 0.1  # no run armed it
    faults.arm()
    try:
        monkeypatch.delenv("RELA_NAN_AT")  # read already: the plan holds
        looked_up = []
        monkeypatch.setattr(faults.os.environ, "get", lambda *a: looked_up.append(a) or None)
        assert faults.poisoned_lr(2, 0.1) == 0.1 and math.isnan(faults.poisoned_lr(3, 0.1))
        faults.kill_point("after-step", 3)
        assert looked_up == []
    finally:
        faults.disarm()
    assert faults.poisoned_lr(3, 0.1) == 0.1
