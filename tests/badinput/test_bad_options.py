"""Options that leave nothing to train on: refused in one line naming the options, before anything is written."""
from __future__ import annotations

import pytest

from badfiles import run_trainer
from builders import FAST_ARGS
from rela.data.budget import BudgetSampler
from rela.errors import RelaError


def test_batch_larger_than_the_dataset_is_refused(tmp_path, capsys):
    """Before: every step trained on one short batch of all 1438 images instead of the 2048 asked for."""
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--prior", "none", "--budget", "1.0",
                       "--batch-size", "2048").error_line
    assert ("an epoch holds 1438 images per rank (--budget 1.0 of 1438 training images over 1 rank(s)), fewer than "
            "one batch (2048 per rank): lower --batch-size or raise --budget") in line
    assert not any((tmp_path / "run").glob("*")), "a refused run writes nothing"


def test_budget_without_a_full_batch_is_refused(tmp_path, capsys):
    """Before: --budget 0.005 trained on 7 images a step where the batch size says 16."""
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--prior", "none", "--budget", "0.005").error_line
    assert "an epoch holds 7 images per rank (--budget 0.005 of 1438 training images" in line
    assert "fewer than one batch (16 per rank)" in line


@pytest.mark.parametrize("n, budget, batch, world", [(100, 1.0, 51, 2), (1000, 0.01, 16, 1), (64, 1.0, 65, 1)])
def test_sampler_refuses_an_epoch_without_a_full_batch_per_rank(n, budget, batch, world):
    with pytest.raises(RelaError, match="fewer than one batch"):
        BudgetSampler(n, budget, batch, seed=0, world_size=world)


@pytest.mark.parametrize("n, budget, batch, world", [(100, 1.0, 50, 2), (1000, 0.016, 16, 1), (65, 1.0, 64, 1)])
def test_sampler_takes_an_epoch_of_exactly_one_batch(n, budget, batch, world):
    sampler = BudgetSampler(n, budget, batch, seed=0, world_size=world)
    assert sampler.steps_per_epoch == 1 and len(sampler.batches(0)[0]) == batch


def test_zero_epochs_is_refused(tmp_path, capsys):
    """Already refused before this work (config.validate); pinned here."""
    line = run_trainer(capsys, tmp_path, *FAST_ARGS, "--epochs", "0").error_line
    assert line == "rela.train: error: --epochs must be an integer >= 1, got 0"
    assert not any((tmp_path / "run").glob("*")), "a refused run writes nothing"


def test_fused_ops_on_without_the_kernels_is_one_line(tmp_path, capsys, monkeypatch):
    """--fused-ops on where the kernels cannot run (here: rela.kernels fails to import) stops before any work."""
    import rela.ops._dispatch as dispatch
    from rela.train import main

    monkeypatch.setattr(dispatch, "HAVE_TRITON", False)
    monkeypatch.setattr(dispatch, "KERNELS_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    assert main([*FAST_ARGS, "--fused-ops", "on", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rela.train: error: --fused-ops on: fused=True (--fused-ops on) needs the Triton kernels"), err
    assert "No module named 'triton'" in err and "Traceback" not in err
