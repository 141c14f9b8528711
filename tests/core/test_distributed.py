"""torchrun with two CPU ranks (gloo): disjoint shards, identical replicas, gathered evaluation, corrupt files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builders import FAST_ARGS, write_imagefolder
from rela.data.budget import BudgetSampler
from rela.data.datasets import load_dataset

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun_train(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "-m", "rela.train", *FAST_ARGS, "--device", "cpu", "--bank-dir", str(tmp_path / "banks"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu_keep_replicas_identical(tmp_path):
    out = tmp_path / "run"
    result = torchrun_train(tmp_path, "--epochs", "2", "--budget", "0.2", "--prior", "rand", "--rela-phase", "0.5",
                            "--out", str(out), "--log-every", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Parameters agree after training itself, before any broadcast at the end. Buffers (BN statistics) do
    # not: each rank's are its own last batch's, which differ when the ranks read different images.
    params, buffers = summary["replica_parameter_digests"], summary["replica_buffer_digests_before_broadcast"]
    assert len(params) == 2 and params[0] == params[1]
    assert buffers[0] != buffers[1]
    assert summary["replica_weights_identical"], summary["replica_weight_digests"]  # after the broadcast
    assert summary["rela_phase_end_step"] is not None
    # Each rank counts the images it really trained on; together one budget's worth per epoch.
    assert summary["images_seen"] == 2 * BudgetSampler(1438, 0.2, 8, seed=0, world_size=2).subset_size
    # Logs come from rank 0 only: each message once.
    assert result.stderr.count("RELA phase over at step") == 1
    assert "DDP wrapped again (find_unused_parameters=False)" in result.stderr
    assert result.stdout.count("linear_probe_top1=") == 1


@pytest.mark.slow
def test_ranks_read_disjoint_shards_that_cover_the_subset_and_gathered_features_equal_one_process(tmp_path):
    findings_path = tmp_path / "findings.json"
    cmd = [*TORCHRUN, str(REPO / "tests" / "core" / "ddp_worker.py"), str(findings_path), str(tmp_path / "banks")]
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    findings = json.loads(findings_path.read_text())
    assert findings["world_size"] == 2
    subsets = []
    for epoch in findings["epochs"]:
        rank0, rank1 = (set(r) for r in epoch["by_rank"])
        assert len(rank0) == len(epoch["by_rank"][0]) and len(rank1) == len(epoch["by_rank"][1])  # no repeats
        assert not rank0 & rank1
        assert rank0 | rank1 == set(epoch["subset"])
        subsets.append(set(epoch["subset"]))
    assert subsets[0] != subsets[1]  # a fresh subset each epoch
    assert findings["gathered_rows"] == findings["train_images"]
    assert findings["gathered_equals_single_process"]


def seed_with_an_all_corrupt_micro_batch(folder: Path, corrupt_names: set[str], per_rank_batch: int
                                         ) -> tuple[int, int, int]:
    """A seed whose split and sampling put a micro-batch of only corrupt files on one rank; the size of its
    training split and how many corrupt files that holds."""
    for seed in range(200):
        train = load_dataset("imagefolder", str(folder), split_seed=seed).train
        corrupt = {i for i in range(len(train)) if train.path(i).name in corrupt_names and
                   train.path(i).parent.name == "class_0"}
        for rank in range(2):
            sampler = BudgetSampler(len(train), 1.0, per_rank_batch, seed=seed, rank=rank, world_size=2)
            if any(set(b.tolist()) <= corrupt for epoch in range(2) for b in sampler.batches(epoch)):
                return seed, len(train), len(corrupt)
    raise AssertionError("no seed in 0..199 puts an all-corrupt micro-batch on a rank")


@pytest.mark.slow
def test_torchrun_with_an_all_corrupt_micro_batch_on_one_rank_keeps_ranks_in_step(tmp_path):
    folder = write_imagefolder(tmp_path / "tree", classes=2, per_class=12)
    names = {"img_000.jpg", "img_001.jpg", "img_002.jpg", "img_003.jpg"}
    for name in names:
        bad = folder / "class_0" / name
        bad.write_bytes(bad.read_bytes()[:64])
    seed, train_size, corrupt_in_train = seed_with_an_all_corrupt_micro_batch(folder, names, per_rank_batch=2)
    out = tmp_path / "run"
    result = torchrun_train(tmp_path, "--dataset", "imagefolder", "--data", str(folder), "--epochs", "2",
                            "--batch-size", "4", "--budget", "1.0", "--prior", "rand", "--skip-corrupt",
                            "--seed", str(seed), "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replica_weights_identical"]
    assert summary["replica_parameter_digests"][0] == summary["replica_parameter_digests"][1]
    # Budget 1.0: training meets every corrupt file of its split, apart from what the bank's pass met.
    assert summary["skipped_corrupt_in_training"] == corrupt_in_train > 0
    assert summary["skipped_corrupt"] == corrupt_in_train
    # The all-corrupt micro-batch still made a step (black placeholders), so both ranks ran every step;
    # corrupt files in mixed batches are dropped from them, so fewer images than the subsets hold.
    sampler = BudgetSampler(train_size, 1.0, 2, seed=seed, world_size=2)
    assert summary["train_steps"] == 2 * sampler.steps_per_epoch
    assert 2 * (sampler.subset_size - corrupt_in_train) <= summary["images_seen"] < 2 * sampler.subset_size


def test_the_run_is_released_before_the_process_group_goes(tmp_path, monkeypatch):
    """DDP's reducer must not hold the process group's last reference when the group is destroyed: its
    destructor would then join gloo's worker threads with the GIL held (a hang seen with torch 2.11).
    In-process, one rank: when shutdown() runs, no Learner of the run may still be alive."""
    import gc

    import rela.train as train_module
    from rela.methods.learner import Learner
    from rela.options import parse_config

    alive_at_shutdown = []

    def shutdown():
        gc.collect()
        alive_at_shutdown.append(sum(isinstance(obj, Learner) for obj in gc.get_objects()))

    monkeypatch.setattr(train_module.dist_utils, "shutdown", shutdown)
    cfg = parse_config([*FAST_ARGS, "--device", "cpu", "--prior", "rand", "--rela-phase", "0.5",
                        "--bank-dir", str(tmp_path / "banks"), "--out", str(tmp_path / "run")])
    assert train_module.run(cfg) is not None
    assert alive_at_shutdown == [0]
