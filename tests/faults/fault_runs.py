"""Shared pieces of the fault tests: one small run's options, a subprocess launcher that injects a fault
(rela/utils/faults.py), and comparisons with the uninterrupted run (conftest.py's `uninterrupted`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from builders import FAST_ARGS, assert_same_backbones

REPO = Path(__file__).resolve().parents[2]

# 2 epochs of 8 steps; the RELA phase ends at step 6, mid-epoch; checkpoints at 4, 8 (epoch end), 12 and
# 16 (epoch end). Deterministic, so a resumed run must end with the uninterrupted run's exact weights.
ARGS = [*FAST_ARGS, "--epochs", "2", "--budget", "0.1", "--prior", "rand", "--rela-phase", "0.4", "--deterministic",
        "--ckpt-every", "4", "--log-every", "3", "--no-monitor", "--bank-batch-size", "64"]
HAND_OVER_STEP, TOTAL_STEPS = 6, 16


def train_process(*args: str, faults: dict[str, str] | None = None, cwd: Path | None = None,
                  timeout: int = 300) -> subprocess.CompletedProcess:
    """python -m rela.train in a child process with RELA_* fault variables. The child keeps this process's
    thread settings (no OMP_NUM_THREADS of its own): float sums depend on the thread count, and the
    uninterrupted run it is compared with ran in this process."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", **(faults or {})}
    return subprocess.run([sys.executable, "-m", "rela.train", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_ends_like(run_dir: Path, reference: Path) -> None:
    """Same final weights (every tensor of backbone.pt, bit for bit), summary and logged steps."""
    assert_same_backbones(Path(run_dir), Path(reference))
    a, b = summary_of(run_dir), summary_of(reference)
    for key in ("train_steps", "images_seen", "rela_phase_end_step", "linear_probe_top1", "knn_top1",
                "replica_weight_digests"):
        assert a[key] == b[key], key
    assert metric_steps(run_dir) == metric_steps(reference)
