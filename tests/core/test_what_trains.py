"""What the loop really feeds each step and what the evaluation really scores, spied on in-process runs:
each epoch trains on that epoch's budget subset (across a mid-epoch resume too), the logged learning rate
and EMA momentum are the recipe's schedules at every step, and the kNN and the probe score the validation
split against the training split's memory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import rela.eval.frozen
import rela.train
from builders import FAST_ARGS, training_rows
from rela.data.budget import BudgetSampler
from rela.data.datasets import load_dataset

ARGS = [*FAST_ARGS, "--epochs", "3", "--budget", "0.2", "--prior", "none", "--no-monitor"]


def _spy_steps(monkeypatch) -> list[list[int]]:
    """Each optimiser step's dataset indices, in order."""
    steps: list[list[int]] = []
    real = rela.train.train_step

    def spy(model, optimizer, ema, micro_batches, *args, **kwargs):
        steps.append([i for b in micro_batches for i in b.index.tolist()])
        return real(model, optimizer, ema, micro_batches, *args, **kwargs)

    monkeypatch.setattr(rela.train, "train_step", spy)
    return steps


def _sampler(out: Path) -> BudgetSampler:
    cfg = json.loads((out / "config.json").read_text())
    splits = load_dataset(cfg["dataset"], cfg["data"], split_seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    return BudgetSampler(len(splits.train), cfg["budget"], cfg["batch_size"], seed=cfg["seed"])


@pytest.mark.parametrize("stop_after", [None, 23], ids=["uninterrupted", "resumed_mid_epoch"])
def test_each_epoch_trains_on_that_epochs_subset(tmp_path, monkeypatch, stop_after):
    out = tmp_path / "run"
    steps = _spy_steps(monkeypatch)
    if stop_after is not None:
        assert rela.train.main([*ARGS, "--out", str(out), "--stop-after-steps", str(stop_after)]) == 0
        assert len(steps) == stop_after
        assert rela.train.main([*ARGS, "--out", str(out), "--resume", "auto"]) == 0
    else:
        assert rela.train.main([*ARGS, "--out", str(out)]) == 0
    sampler = _sampler(out)
    per_epoch = sampler.steps_per_epoch
    assert stop_after is None or stop_after % per_epoch, "the stop must fall inside an epoch"
    assert len(steps) == 3 * per_epoch
    for epoch in range(3):
        trained = [i for step in steps[epoch * per_epoch:(epoch + 1) * per_epoch] for i in step]
        # In the sampler's order, not only the same set: the loader visits the subset as drawn.
        assert trained == sampler.epoch_subset(epoch).tolist(), f"epoch {epoch}"
    assert set(sampler.epoch_subset(0)) != set(sampler.epoch_subset(1))  # the check above can tell epochs apart


def test_logged_lr_and_momentum_are_the_schedules_at_every_step(tmp_path):
    """Transcriptions of the recipe (not the trainer's own functions): linear warm-up to lr x batch / 256, then
    cosine to 0; BYOL's momentum 1 - (1 - base)(cos(pi k / K) + 1) / 2."""
    out = tmp_path / "run"
    assert rela.train.main([*ARGS, "--out", str(out), "--log-every", "1", "--lr", "0.4", "--warmup-epochs", "1",
                            "--lr-schedule", "cosine", "--base-momentum", "0.9", "--momentum-schedule", "cosine",
                            "--method", "byol"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    rows = training_rows(out)
    total = len(rows)
    warmup = total // cfg["epochs"]
    peak = 0.4 * cfg["batch_size"] / 256
    for row in rows:
        k = row["step"] - 1  # the row is logged after its step; the step ran with the schedules at k
        if k < warmup:
            lr = peak * (k + 1) / warmup
        else:
            lr = peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        momentum = 1 - (1 - 0.9) * (math.cos(math.pi * k / total) + 1) / 2
        assert row["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15), k
        assert row["momentum"] == pytest.approx(momentum, rel=1e-12, abs=1e-15), k
    assert rows[-1]["momentum"] > rows[0]["momentum"]  # rising towards 1: a reversed schedule fails above


def test_knn_and_probe_score_the_validation_split_against_the_training_memory(tmp_path, monkeypatch):
    seen = {}
    real = rela.eval.frozen.probe_and_knn

    def spy(train_x, train_y, val_x, val_y, *args, **kwargs):
        seen.update(train_x=train_x.clone(), train_y=train_y.tolist(), val_x=val_x.clone(), val_y=val_y.tolist())
        return real(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(rela.eval.frozen, "probe_and_knn", spy)
    out = tmp_path / "run"
    assert rela.train.main([*ARGS, "--epochs", "1", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    splits = load_dataset(cfg["dataset"], cfg["data"], split_seed=cfg["seed"], val_fraction=cfg["val_fraction"])
    assert seen["train_y"] == list(splits.train.labels) and seen["val_y"] == list(splits.val.labels)
    assert len(seen["train_x"]) == len(splits.train) and len(seen["val_x"]) == len(splits.val)
    # The validation rows are the validation images' features, not training rows relabelled: none of them
    # equals any training row (digits has no duplicate images across the split).
    distances = np.asarray((seen["val_x"][:, None, :] - seen["train_x"][None, :, :]).abs().amax(-1))
    assert distances.min() > 0
