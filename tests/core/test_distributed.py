"""torchrun with two CPU ranks (gloo): the run finishes and both replicas end with identical weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from builders import FAST_ARGS, write_imagefolder

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_ranks_on_cpu_keep_replicas_identical(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rela.train",
           *FAST_ARGS, "--epochs", "2", "--budget", "0.2", "--prior", "rand", "--rela-phase", "0.5",
           "--out", str(out), "--bank-dir", str(tmp_path / "banks"), "--log-every", "2"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["replica_weights_identical"], summary["replica_weight_digests"]
    assert summary["rela_phase_end_step"] is not None
    # Each rank trains on a disjoint half of the budget: together one budget's worth per epoch.
    assert summary["images_seen"] == 2 * (int(1438 * 0.2) // 2 * 2)
    # Logs come from rank 0 only: each message once.
    assert result.stderr.count("RELA phase over at step") == 1
    assert result.stdout.count("linear_probe_top1=") == 1


def test_torchrun_with_skipped_corrupt_files_does_not_hang(tmp_path):
    """A corrupt file on one rank only: evaluation gathers uneven shards, training keeps steps in step."""
    folder = write_imagefolder(tmp_path / "tree", classes=2, per_class=12)
    for name in ("img_000.jpg", "img_001.jpg"):  # a whole batch of 2 on one rank, in some epoch
        bad = folder / "class_0" / name
        bad.write_bytes(bad.read_bytes()[:64])
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rela.train",
           *FAST_ARGS, "--dataset", "imagefolder", "--data", str(folder), "--epochs", "2", "--batch-size", "4",
           "--budget", "1.0", "--prior", "rand", "--skip-corrupt", "--out", str(out), "--bank-dir",
           str(tmp_path / "banks")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replica_weights_identical"]
    assert summary["skipped_corrupt"] >= 1
