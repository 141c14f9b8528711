"""The torch loader's decoding workers are started once and kept across epochs (persistent_workers), and
still decode each epoch's own subset, in the sampler's order; passes of other sizes (the kNN monitor's, in
the middle of an epoch) have their own workers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rela.data import loader as loader_module
from rela.data.budget import BudgetSampler
from rela.data.datasets import FileImages
from rela.data.loader import TorchImageSource, TorchTrainLoader
from rela.data.views import Normalize

CPU = torch.device("cpu")


def _files(root: Path, n: int) -> FileImages:
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        rel = f"class_{i % 2}/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / rel)
        files.append(rel)
    return FileImages(root, files, np.arange(n) % 2, "worker-files")


@pytest.fixture
def worker_pids(tmp_path, monkeypatch):
    """Reads, then forgets, the pids of the processes that decoded a file since the last call (the workers
    are forked, so they inherit the patched method)."""
    log = tmp_path / "pids.txt"
    log.write_text("")
    decode = loader_module._DecodedFiles.__getitem__

    def logged(self, index):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return decode(self, index)

    monkeypatch.setattr(loader_module._DecodedFiles, "__getitem__", logged)

    def read() -> set[int]:
        pids = {int(line) for line in log.read_text().split()}
        log.write_text("")
        return pids

    return read


def test_workers_are_kept_across_epochs_and_decode_each_epochs_subset(tmp_path, worker_pids):
    dataset = _files(tmp_path / "images", 24)
    sampler = BudgetSampler(len(dataset), 0.5, 4, seed=5)
    loader = TorchTrainLoader(TorchImageSource(dataset, CPU, num_workers=2), sampler, image_size=12, decode_size=16,
                              normalize=Normalize((0.5,) * 3, (0.25,) * 3, CPU), seed=1)
    pids = []
    for epoch in range(3):
        seen = [batch.index.tolist() for batch in loader.epoch(epoch)]
        assert seen == [b.tolist() for b in sampler.batches(epoch)], f"epoch {epoch} is not its own subset"
        pids.append(worker_pids())
    assert sampler.epoch_subset(0).tolist() != sampler.epoch_subset(1).tolist()  # a stale subset would show
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert pids[0] == pids[1] == pids[2], "the decoding workers were started again for a new epoch"

    # Resuming mid-epoch: the same workers, the epoch's remaining batches.
    resumed = [batch.index.tolist() for batch in loader.epoch(1, start_step=2)]
    assert resumed == [b.tolist() for b in sampler.batches(1, start_step=2)]
    assert worker_pids() <= pids[0]


def test_an_evaluation_pass_in_the_middle_of_an_epoch_leaves_the_epoch_intact(tmp_path, worker_pids):
    """The kNN monitor reads the training images at another size between two training steps."""
    dataset = _files(tmp_path / "images", 24)
    source = TorchImageSource(dataset, CPU, num_workers=2)
    sampler = BudgetSampler(len(dataset), 1.0, 4, seed=2)
    epoch_batches = sampler.batches(0)
    training = source.iterate(epoch_batches, mode="train", size=16)
    first = next(training)
    eval_batches = [np.arange(s, s + 5) for s in range(0, 20, 5)]
    evaluated = [index.tolist() for _, index in source.iterate(eval_batches, mode="eval", size=12)]
    rest = [index.tolist() for _, index in training]
    assert evaluated == [b.tolist() for b in eval_batches]
    assert [first[1].tolist(), *rest] == [b.tolist() for b in epoch_batches]
    assert len(worker_pids()) == 4  # two workers for each size
    again = [index.tolist() for _, index in source.iterate(eval_batches, mode="eval", size=12)]
    assert again == evaluated and len(worker_pids()) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_superseded_pass_raises_instead_of_yielding_the_newer_passs_batches(tmp_path, workers):
    dataset = _files(tmp_path / "images", 12)
    source = TorchImageSource(dataset, CPU, num_workers=workers)
    older = source.iterate([np.arange(0, 4), np.arange(4, 8)], mode="train", size=16)
    next(older)
    newer = [index.tolist() for _, index in source.iterate([np.arange(8, 12)], mode="train", size=16)]
    assert newer == [list(range(8, 12))]
    with pytest.raises(RuntimeError, match="superseded"):
        next(older)
