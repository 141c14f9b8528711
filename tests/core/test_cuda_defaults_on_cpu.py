"""The CUDA default configuration, run as far as a CPU can: torch.compile on the backbones (AOTAutograd, the
stage that refused the EMA's flat buffers), the fused ops and the fused EMA in Triton's interpreter,
channels_last, bf16 autocast, the hand-over from RELA to BYOL, DDP over two ranks (gloo)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builders import FAST_ARGS, training_rows

REPO = Path(__file__).resolve().parents[2]
# TRITON_INTERPRET before Triton's import in each rank: --fused-ops on then runs the kernels on CPU tensors.
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1",
       "TRITON_INTERPRET": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# What --device cuda would choose by itself (compile auto, fused-ops auto, precision auto, channels_last
# default), spelled out for the CPU; aot_eager is AOTAutograd without Inductor's code generation.
CUDA_DEFAULTS = ["--compile", "on", "--compile-backend", "aot_eager", "--fused-ops", "on", "--channels-last",
                 "--precision", "bf16"]


@pytest.mark.slow
def test_cuda_defaults_train_through_the_hand_over_on_two_ranks(tmp_path):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "rela.train", *FAST_ARGS, "--bank-dir", str(tmp_path / "banks"), "--budget", "0.2",
           "--prior", "rand", "--rela-phase", "0.5", "--log-every", "1", "--no-monitor", "--out", str(out),
           *CUDA_DEFAULTS]
    result = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["compile"], config["fused_ops"], config["precision"], config["channels_last"]) == ("on", "on", "bf16", True)
    rows = training_rows(out)
    step_fns = [r["step_fn"] for r in rows]
    assert "rela_step" in step_fns and "byol_step" in step_fns, step_fns
    assert step_fns.index("byol_step") > step_fns.index("rela_step")
    assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rela_phase_end_step"] is not None
    params = summary["replica_parameter_digests"]
    assert len(params) == 2 and params[0] == params[1]
    assert summary["replica_weights_identical"]
