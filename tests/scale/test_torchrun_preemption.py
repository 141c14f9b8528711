"""Preemption through torchrun: a SIGUSR1 sent to torchrun itself (as a scheduler's `--signal` does), with
`--signals-to-handle` naming it, reaches the workers, which checkpoint at the next step boundary and exit 75.
torchrun then exits 1 whatever its workers' statuses (measured with torch 2.14), so the run leaves
RUN/requeue.json for the job script to read; a resumed run removes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import FAST_ARGS
from rela.utils.checkpoint_files import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
pytestmark = pytest.mark.slow  # torchrun runs: the slow tier (README: Tests)
ARGS = [*FAST_ARGS, "--prior", "none", "--epochs", "40", "--log-every", "1", "--no-monitor"]


def test_sigusr1_to_torchrun_checkpoints_and_leaves_the_requeue_marker(tmp_path):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "rela.train", *ARGS, "--out", str(out), "--bank-dir", str(tmp_path / "banks")]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
            assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGUSR1)
        _, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert err.count("rela.train: SIGUSR1 received: stopped after step") == 2, err[-3000:]  # both workers
    assert launcher.returncode != 0  # torchrun's own status says nothing of the workers' 75
    marker = json.loads((out / "requeue.json").read_text())
    checkpoint = latest_checkpoint(out)
    assert marker["exit"] == 75 and checkpoint is not None and marker["step"] == int(checkpoint.stem.split("-")[1])
    assert marker["step"] < 40 * 17  # stopped early, not at the end

    resumed = subprocess.run([*TORCHRUN, "-m", "rela.train", *ARGS, "--out", str(out), "--bank-dir",
                              str(tmp_path / "banks"), "--resume", "auto", "--stop-after-steps", str(marker["step"] + 1)],
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {marker['step']}" in resumed.stderr
    assert not (out / "requeue.json").exists()  # the requeued attempt took it over
