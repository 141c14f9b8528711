"""The target bank's build: precision in the key, the prefetching loader, the projection split over ranks."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rela.prior.target_bank import (PrefetchingLoader, _read_bank, bank_key, key_differences, next_in_shard,
                                    prior_encoder, prior_precision, project_rows, shard_bounds)
from rela.utils.distributed import DistInfo

WORKER = Path(__file__).with_name("bank_build_worker.py")
_spec = importlib.util.spec_from_file_location("bank_build_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

REPO = Path(__file__).resolve().parents[2]


def _key(precision: str) -> dict:
    return bank_key(dataset="d", prior=worker.make_prior(), crop_fraction=0.875, target_dim=8, num_rows=10,
                    precision=precision)


def test_key_differs_between_precisions():
    assert prior_precision(torch.device("cpu")) == "fp32"
    assert prior_precision(torch.device("cuda", 0)) == "bf16"
    assert key_differences(_key("bf16"), _key("fp32")) == ["precision ('bf16' -> 'fp32')"]


def test_a_bf16_bank_is_rebuilt_not_reused_for_an_fp32_run(tmp_path, caplog):
    bank = worker.build_bank(tmp_path, DistInfo())
    assert bank.key["precision"] == "fp32" and not bank.reused
    (path,) = tmp_path.glob("bank-*.pt")
    saved = torch.load(path, weights_only=False)
    saved["key"]["precision"] = "bf16"  # as a CUDA run would have written it
    torch.save(saved, path)
    with caplog.at_level(logging.INFO, logger="bank-test"):
        again = worker.build_bank(tmp_path, DistInfo())
    assert not again.reused
    assert "precision ('bf16' -> 'fp32')" in caplog.text
    assert _read_bank(path)[0]["precision"] == "fp32"
    assert worker.build_bank(tmp_path, DistInfo()).reused


class _Recorder:
    """A slow load that records the indices it loads, on which thread, and fails if run twice at once."""

    def __init__(self, delay: float = 0.01):
        self.calls, self.delay, self.busy = [], delay, threading.Lock()

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        assert self.busy.acquire(blocking=False), "load ran on two threads at once"
        try:
            time.sleep(self.delay)
            self.calls.append((indices.tolist(), threading.current_thread().name))
            return worker.load_batch(indices)
        finally:
            self.busy.release()


def test_prefetching_loader_gives_the_same_rows_in_the_same_order():
    """Consecutive batches (prefetched), a jump (a missed guess), a repeat, the padded last batch."""
    requests = [torch.arange(0, 4), torch.arange(4, 8), torch.arange(12, 16), torch.arange(12, 16),
                torch.arange(16, 20), torch.tensor([20, 21, 21, 21])]
    load = _Recorder()
    with PrefetchingLoader(load, next_in_shard(22)) as prefetching:
        batches = [prefetching(indices) for indices in requests]
    for indices, batch in zip(requests, batches):
        assert torch.equal(batch, worker.load_batch(indices))
    assert prefetching.hits == 3  # 4:8 after 0:4, 16:20 after 12:16, the padded 20,21 after 16:20
    assert [(indices, thread.startswith("bank-prefetch")) for indices, thread in load.calls if indices == [20, 21, 21, 21]] \
        == [([20, 21, 21, 21], True)]


def test_prefetching_loader_raises_the_error_of_the_batch_asked_for():
    def load(indices):
        if int(indices[0]) == 4:
            raise OSError("cannot read image 4")
        return worker.load_batch(indices)

    with PrefetchingLoader(load, next_in_shard(100)) as prefetching:
        prefetching(torch.arange(0, 4))
        with pytest.raises(OSError, match="image 4"):
            prefetching(torch.arange(4, 8))
    with PrefetchingLoader(load, next_in_shard(100)) as prefetching:
        prefetching(torch.arange(0, 4))  # the failed prefetch of 4:8 is never asked for
        assert torch.equal(prefetching(torch.arange(9, 13)), worker.load_batch(torch.arange(9, 13)))


def test_the_bank_build_reads_every_batch_after_the_first_ahead_of_the_prior(tmp_path):
    load = _Recorder(delay=0.0)
    bank = worker.build_bank(tmp_path, DistInfo(), load=load)
    raw = [(indices, thread) for indices, thread in load.calls if len(indices) == worker.BATCH]  # not the probe (2 rows)
    expected = [list(range(start, min(start + 4, 37))) for start in range(0, 37, 4)]
    expected[-1] += expected[-1][-1:] * (4 - len(expected[-1]))
    assert [indices for indices, _ in raw] == expected
    assert [thread.startswith("bank-prefetch") for _, thread in raw] == [False] + [True] * (len(expected) - 1)
    assert bank.targets.shape == (37, worker.TARGET_DIM)


def test_project_rows_covers_every_row_once_whatever_the_chunk():
    features, projection = worker.projection_fixture(num_rows=53)
    whole = project_rows(features, projection, torch.device("cpu"), chunk=1000)
    expected = projection.apply(torch.from_numpy(features))
    assert torch.equal(whole, expected)
    assert torch.equal(project_rows(features, projection, torch.device("cpu"), chunk=7), expected)
    assert shard_bounds(53, 2) == [0, 26, 53]


def test_sharded_projection_and_bank_under_torchrun_equal_one_process(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--out", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    features, projection = worker.projection_fixture()
    expected = project_rows(features, projection, torch.device("cpu"))
    single_bank = worker.build_bank(tmp_path / "single", DistInfo())
    for rank in range(2):
        saved = torch.load(out / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(saved["projected"], expected), rank
        assert torch.equal(saved["targets"], single_bank.targets), rank
        assert saved["key"] == single_bank.key


@pytest.mark.gpu
def test_bf16_prior_on_cuda_is_close_to_fp32_and_keyed_apart():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).cuda().eval()
    images = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = net(images)
        out = prior_encoder(net, prior_precision(images.device))(images)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
