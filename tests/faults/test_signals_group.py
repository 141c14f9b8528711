"""SIGTERM to the whole process group, as SLURM and `timeout` send it: the DataLoader workers get it too. They
ignore it, so the main process still checkpoints at the next step boundary and exits 75 (before: the workers
died first, the loader raised on them, and the run exited 1 without a checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from builders import FAST_ARGS, write_imagefolder
from fault_runs import REPO
from rela.utils.checkpoint_files import latest_checkpoint
from rela.utils.signals import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # subprocess runs: the slow tier (README: Tests)


def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_75(tmp_path):
    tree = write_imagefolder(tmp_path / "tree", classes=2, per_class=24, size=(24, 24))
    out = tmp_path / "run"
    args = [*FAST_ARGS, "--dataset", "imagefolder", "--data", str(tree), "--workers", "2", "--prior", "none",
            "--batch-size", "4", "--budget", "1.0", "--log-every", "1", "--ckpt-every", "1000", "--no-monitor",
            "--out", str(out), "--bank-dir", str(tmp_path / "banks")]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
           "RELA_SLEEP_AT": "after-step:2:4"}  # the signal arrives while the workers are alive, mid-epoch
    child = subprocess.Popen([sys.executable, "-m", "rela.train", *args], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not _logged_step(out, 2):
            assert child.poll() is None and time.time() < deadline, child.communicate()[1][-3000:]
            time.sleep(0.1)
        os.killpg(child.pid, signal.SIGTERM)  # the main process and its two workers
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == EXIT_REQUEUE, err[-3000:]
    assert "rela.train: SIGTERM received: stopped after step 2 with a checkpoint" in err, err[-3000:]
    assert latest_checkpoint(out).name == "ckpt-000000002.pt"


def _logged_step(run_dir, step: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = metrics.read_text().splitlines()
    return any(json.loads(line).get("step") == step for line in lines if line.endswith("}"))
