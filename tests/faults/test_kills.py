"""SIGKILL at every stage of a run, one after another in the same run folder, each followed by
`--resume auto`: the run ends with the uninterrupted run's weights, summary and metric rows. (Five
processes die; the BYOL phase's death is the one inside a checkpoint write, which saves a sixth.)"""
from __future__ import annotations

import signal

import pytest

from fault_runs import ARGS, HAND_OVER_STEP, TOTAL_STEPS, assert_ends_like, train_process
from rela.train import main
from rela.utils.checkpoint_files import latest_checkpoint


@pytest.mark.slow  # six processes, five of them killed
def test_sigkill_at_every_stage_then_resume_ends_where_an_uninterrupted_run_does(tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = [*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(out), "--resume", "auto"]

    def killed_at(point: str) -> None:
        result = train_process(*args, faults={"RELA_KILL_AT": point})
        assert result.returncode == -signal.SIGKILL, f"{point}: {result.returncode}\n{result.stderr[-3000:]}"

    killed_at("bank-build:256")  # the raw pass, 256 of 1438 rows encoded
    assert latest_checkpoint(out) is None and list((tmp_path / "banks").glob("raw-*.bank"))
    assert not list((tmp_path / "banks").glob("bank-*.pt"))
    killed_at("after-step:6")  # the RELA phase, after the checkpoint at step 4
    assert latest_checkpoint(out).name == "ckpt-000000004.pt"
    killed_at(f"hand-over:{HAND_OVER_STEP}")  # the switch step: the phase has just changed in memory
    assert latest_checkpoint(out).name == "ckpt-000000004.pt"
    # The BYOL phase, in a checkpoint write: the file complete under its temporary name, not yet renamed.
    killed_at("write:ckpt-000000008.pt")
    assert latest_checkpoint(out).name == "ckpt-000000004.pt"
    assert list((out / "checkpoints").glob(".ckpt-000000008.pt.tmp-*"))
    killed_at(f"evaluate:{TOTAL_STEPS}")  # training done, the probes not yet
    assert latest_checkpoint(out).name == f"ckpt-{TOTAL_STEPS:09d}.pt"
    assert not (out / "summary.json").exists()

    assert main(args) == 0
    assert_ends_like(out, uninterrupted)
    assert not list((out / "checkpoints").glob(".ckpt-*.tmp-*")), "a killed writer's temporary file is left"
