"""benchmarks/throughput.py compares like with like: the supervised step runs with the trainer's autocast,
memory format and compilation (same backend) as the BYOL and RELA steps do, and the prior's forward (the
projection's bank rate) runs as the target bank runs the prior; each row records what it ran with, read off
its networks and batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import benchmarks.throughput_steps as throughput_steps
from benchmarks.throughput_steps import PriorForward, StepSetup, SupervisedStep, TrainerStep

REPO = Path(__file__).resolve().parents[2]
TRAIN_STEPS = {"supervised", "byol", "rela"}


def gpu_like_setup() -> StepSetup:
    """What the trainer runs on CUDA (bf16 autocast, channels_last, compiled), at a CPU-sized scale."""
    return StepSetup("t", "small_resnet", 4, 16, "bf16", True, 64, 32, "adamw", 1e-3, 0.0, 0.99, 10,
                     compile=True, compile_backend="eager")


def test_supervised_step_runs_as_the_trainer_steps_do():
    setup = gpu_like_setup()
    byol = TrainerStep(setup, torch.device("cpu"), fused=False)
    supervised = SupervisedStep(setup, torch.device("cpu"), byol.batch)
    expected = {"precision": "bf16", "channels_last": True, "input_dtype": "bfloat16", "input_channels_last": True,
                "compiled": True, "compile_backend": "eager"}
    assert byol.settings == expected
    assert supervised.settings == expected


def test_prior_forward_runs_at_the_target_banks_precision(monkeypatch):
    """Where the bank runs its prior in bf16 on channels_last (CUDA), so does the timed forward."""
    monkeypatch.setattr(throughput_steps, "prior_precision", lambda device: "bf16")
    setup = gpu_like_setup()
    batch = TrainerStep(setup, torch.device("cpu"), fused=False).batch
    prior = PriorForward(setup, torch.device("cpu"), batch)
    assert prior.precision == "bf16"
    assert (prior.settings["precision"], prior.settings["channels_last"], prior.settings["compiled"]) == ("bf16", True, False)
    timing = {"median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0, "repeats": 1}
    row = throughput_steps.step_row(setup, "prior forward", None, timing, settings=prior.settings)
    check = throughput_steps.like_for_like([row], torch.device("cpu"))[0]["prior_forward"]
    assert check["same"] and check["target_bank"] == {"precision": "bf16", "channels_last": True}


def test_a_tiny_compiled_run_records_the_same_settings_on_both_sides(tmp_path):
    """The benchmark's own JSON, from a tiny CPU run with --compile on: every timed supervised, BYOL and RELA
    row says compiled with the same backend, precision and layout; the prior's forward as the bank's."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--steps-only", "--device", "cpu",
         "--arch", "small_resnet", "--image-size", "16", "--batch-size", "4", "--step-warmup", "1",
         "--step-rounds", "1", "--step-repeats", "1", "--compile", "on", "--compile-backend", "eager",
         "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "throughput.json").read_text())
    assert [setup["compile"] for setup in payload["step"]["setups"]] == [True]
    rows = [r for r in payload["step"]["rows"] if r["images_per_s"] is not None]
    train = [r for r in rows if r["step"] in TRAIN_STEPS]
    assert {r["step"] for r in train} == TRAIN_STEPS
    for r in train:
        assert (r["compiled"], r["compile_backend"], r["precision"], r["channels_last"]) == (True, "eager", "fp32", False), r
        assert (r["input_dtype"], r["input_channels_last"]) == ("float32", False), r
    prior = next(r for r in rows if r["step"] == "prior forward")
    check = payload["step"]["like_for_like"][0]
    assert check["train_steps"]["same"] and check["train_steps"]["settings"]["compiled"]
    assert check["prior_forward"]["same"]
    assert (prior["precision"], prior["channels_last"]) == (check["prior_forward"]["target_bank"]["precision"],
                                                          check["prior_forward"]["target_bank"]["channels_last"])
    for key in ("device", "versions", "commit", "date"):
        assert key in payload["environment"]
    assert "end_to_end" not in payload and "loader" not in payload and "target_bank" not in payload
