"""Resuming with an option that changes the run's trajectory is refused, naming the option and both values."""
from __future__ import annotations

import shutil

import pytest

from fault_runs import ARGS
from rela.train import main


@pytest.mark.parametrize("option, before, after", [("--budget", "0.1", "0.2"), ("--val-fraction", "0.2", "0.3")])
def test_resume_with_a_changed_trajectory_option_is_refused_naming_it(tmp_path, uninterrupted, capsys,
                                                                       option, before, after):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    checkpoint = out / "checkpoints" / "ckpt-000000016.pt"
    saved = checkpoint.read_bytes()
    args = [*ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(out), "--resume", "auto", option, after]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"rela.train: error: cannot resume {checkpoint} with other settings: {option} {before} -> {after}" in err, \
        err[-3000:]
    assert checkpoint.read_bytes() == saved and not (out / "summary.json").exists()
