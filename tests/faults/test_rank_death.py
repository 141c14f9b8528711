"""One rank of two dies under `torchrun --max-restarts=1`: the restarted group, launched with the same
`--resume auto` as the first (whose folder had no checkpoint yet), resumes from the last checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fault_runs import ARGS, REPO


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_is_restarted_and_the_group_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "rela.train", *ARGS, "--bank-dir", str(tmp_path / "banks"), "--out", str(out), "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}", "OMP_NUM_THREADS": "1",
           "RELA_KILL_AT": "after-step:6", "RELA_KILL_RANK": "1"}  # the first attempt's rank 1 only
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(exitcode: -9) local_rank: 1" in result.stderr, result.stderr[-4000:]  # the first attempt's death
    assert f"resumed from {out / 'checkpoints' / 'ckpt-000000004.pt'} at step 4" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_steps"] == 16 and summary["replica_weights_identical"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Each step's row once, across the restart (the hand-over at step 6 has its own row beside step 6's).
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16
    assert [r["step"] for r in rows if "rela_phase_end_step" in r] == [6]
