"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU, and fits the SM at launch.

The interpreter tests check what the kernels compute; they cannot see what only the compiler rejects, nor
registers and shared memory, which make a launch fail on the GPU ("out of resources"). tests/ops/
compile_for_hopper.py runs Triton's real compiler down to a cubin for each launch the GPU tests and the trainer
make; this test reads its resource report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
REGISTERS_PER_SM = 65_536
MAX_SHARED_PER_BLOCK = 227 * 1024  # sm_90, with the opt-in Triton makes
# The trainer's own shapes: a spill there costs every step (the odd test shapes may spill).
HOT_CASES = ("70000x256 contiguous", "512x2048 contiguous", "256x65536 contiguous", "64x4096 contiguous")


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(HERE / "compile_for_hopper.py")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_kernel_compiles_for_sm_90_in_every_case(compiled):
    kernels = {row["kernel"] for row in compiled}
    assert kernels == {"cosine_loss_fwd_kernel", "cosine_loss_bwd_kernel", "dino_loss_fwd_kernel",
                       "dino_loss_bwd_kernel", "ema_kernel"}
    assert {row["target"] for row in compiled} == {"sm_90"}
    for family in ("cosine_loss", "dino_loss"):  # every forward case has its backward
        cases = {kind: {row["case"] for row in compiled if row["kernel"] == f"{family}_{kind}_kernel"}
                 for kind in ("fwd", "bwd")}
        assert cases["fwd"] == cases["bwd"] and len(cases["fwd"]) >= 9, family
    assert sum(row["kernel"] == "ema_kernel" for row in compiled) == 6  # 3 dtypes x float or tensor momentum


def test_every_kernel_fits_an_sm_at_launch(compiled):
    for row in compiled:
        threads = 32 * row["num_warps"]
        assert row["registers"] * threads <= REGISTERS_PER_SM, row
        assert row["static_shared"] + row["dynamic_shared"] <= MAX_SHARED_PER_BLOCK, row


def test_the_trainers_shapes_do_not_spill(compiled):
    hot = [row for row in compiled if row["case"].split(", ")[0].endswith(HOT_CASES) and "float64" not in row["case"]]
    hot += [row for row in compiled if row["kernel"] == "ema_kernel" and "float64" not in row["case"]]
    assert len(hot) >= 20
    spilling = [(row["kernel"], row["case"], row["stack"], row["local"]) for row in hot if row["stack"] or row["local"]]
    assert not spilling
