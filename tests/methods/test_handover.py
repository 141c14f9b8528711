"""The soft hand-overs (rela/methods/handover.py): lambda as each mode defines it at every step, the blended
loss as the weighted sum of the two losses, the controller following the RELA part, the teacher reset, and a
resume in the middle of a blend that ends where the uninterrupted run does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from builders import FAST_ARGS, assert_same_backbones, training_rows
from rela.methods.handover import linear_weight, reset_teacher_, rho_weight
from rela.methods.learner import RELA_PHASE, Learner, method_phase
from rela.methods.rela import PhaseController, RelaMap, rela_loss_of
from rela.methods.registry import build_method
from rela.models.backbones import build_backbone
from rela.options import parse_config
from rela.step import make_ema_updater
from rela.train import main

# 3 epochs of 8 steps; with --rela-phase 0.5 the RELA phase ends at step 12.
ARGS = [*FAST_ARGS, "--epochs", "3", "--budget", "0.1", "--prior", "rand", "--deterministic", "--ckpt-every", "4",
        "--log-every", "1", "--proj-hidden", "32", "--proj-dim", "16"]


def test_linear_weights_fall_over_the_set_steps_and_rho_weights_between_the_two_levels():
    assert [linear_weight(k, 4) for k in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert [rho_weight(r, 0.9, 0.995) for r in (0.0, 0.9, 0.9475, 0.995, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])


def byol_learner(seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    cfg = parse_config(["--dataset", "digits", "--proj-hidden", "32", "--proj-dim", "16"])
    backbone = build_backbone("small_resnet", seed=seed)
    return Learner(build_method(cfg, backbone), RelaMap(backbone.feature_dim, 12, trainable=False, seed=1), 10)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_a_blended_step_is_the_weighted_sum_of_the_two_losses(weight):
    learner = byol_learner()
    g = torch.Generator().manual_seed(0)
    view1, view2, targets = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 12, generator=g)
    label = torch.arange(8) % 10
    phase = RELA_PHASE if weight == 1.0 else method_phase("byol")
    loss, _, _, rela_loss = learner(view1, view2, label, targets, phase, False, weight)
    method_loss, features = learner.method(view1, view2, fused=False)
    expected_rela = rela_loss_of(learner.rela_map, features, targets, fused=False)
    assert loss.item() == pytest.approx(weight * expected_rela.item() + (1 - weight) * method_loss.item(), rel=1e-6)
    if weight == 0.0:
        assert rela_loss is None and learner.last_step_fn == "byol_step"
    else:
        assert rela_loss.item() == pytest.approx(expected_rela.item(), rel=1e-6)
        assert learner.last_step_fn == ("rela_step" if weight == 1.0 else "blend_byol_step")


@pytest.mark.parametrize("fused", [False, True])
def test_the_teacher_reset_copies_the_student_and_the_ema_still_moves_it(fused):
    learner = byol_learner()
    ema = make_ema_updater(learner, fused=fused)
    teacher, student = learner.method.teacher_pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    reset_teacher_(learner.method.teacher_pair())
    for mine, theirs in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(mine, theirs)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(2.0)
    ema(0.5)  # the EMA moves the tensors the reset wrote (on the fused path: views into its flat buffer)
    for old, new in zip(before, teacher.parameters()):
        assert torch.allclose(new, old + 1.0)


def test_linear_hand_over_blends_the_set_steps_and_resumes_in_the_blend(tmp_path):
    args = [*ARGS, "--bank-dir", str(tmp_path / "banks"), "--rela-phase", "0.5", "--handover", "linear",
            "--handover-steps", "4"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    rows = {r["step"]: r for r in training_rows(tmp_path / "whole")}
    assert [rows[s]["rela_weight"] for s in range(1, 13)] == [1.0] * 12
    assert [rows[s]["rela_weight"] for s in range(13, 18)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert [rows[s]["step_fn"] for s in range(12, 18)] == ["rela_step"] + ["blend_byol_step"] * 4 + ["byol_step"]
    assert all(rows[s]["views"] == "byol" for s in range(13, 25))
    assert all(rows[s]["rela_loss"] is not None for s in range(13, 17)) and rows[17]["rela_loss"] is None
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after-steps", "14"]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")


def test_rho_hand_over_follows_rho_and_the_controller_follows_the_rela_loss(tmp_path):
    args = [*ARGS, "--bank-dir", str(tmp_path / "banks"), "--handover", "rho", "--handover-rho-start", "0.3",
            "--rela-threshold", "0.42"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["rela_phase_ended_by"] == "plateau"
    end = summary["rela_phase_end_step"]
    rows = {r["step"]: r for r in training_rows(tmp_path / "whole")}
    # lambda of step t from rho as the host read it: the update of step t - 2 (rho_before)
    for step in range(3, end + 1):
        assert rows[step]["rela_weight"] == pytest.approx(rho_weight(rows[step - 2]["rho"], 0.3, 0.42)), step
    blended = [s for s in range(1, end + 1) if 0 < rows[s]["rela_weight"] < 1]
    assert blended and all(rows[s]["step_fn"] == "blend_byol_step" and rows[s]["views"] == "rela" for s in blended)
    assert all(rows[s]["loss"] != rows[s]["rela_loss"] for s in blended)
    # the controller's rho, replayed from the logged RELA losses (not the blended loss)
    scale = json.loads((tmp_path / "whole" / "config.json").read_text())["rela_averaging_scale"]
    replay = PhaseController(torch.device("cpu"), threshold=0.42, averaging_scale=scale)
    for step in range(1, end + 1):
        replay.update(torch.tensor(rows[step]["rela_loss"], dtype=torch.float32), step)
        assert replay.rho.item() == pytest.approx(rows[step]["rho"], rel=1e-12), step
    assert all(rows[s]["rela_weight"] == 0.0 and rows[s]["step_fn"] == "byol_step" for s in range(end + 1, 25))
    stop = blended[len(blended) // 2]
    assert main([*args, "--out", str(tmp_path / "split"), "--stop-after-steps", str(stop)]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")


def test_rho_start_at_or_above_the_threshold_is_one_line(capsys):
    assert main([*FAST_ARGS, "--handover", "rho", "--handover-rho-start", "0.995"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "rela.train: error: --handover-rho-start 0.995 must be below --rela-threshold 0.995" in err


@pytest.mark.slow
def test_a_linear_blend_trains_on_two_ranks_with_identical_replicas(tmp_path):
    """DDP wraps the learner again at the hand-over (find_unused_parameters off for the method's phase); a blended
    step uses W and the method's heads together, and both ranks must end with the same weights."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'tests'}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rela.train",
           *ARGS, "--bank-dir", str(tmp_path / "banks"), "--rela-phase", "0.5", "--handover", "linear",
           "--handover-steps", "4", "--out", str(out), "--no-monitor"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {r["step"]: r for r in training_rows(out)}
    assert [rows[s]["step_fn"] for s in range(13, 18)] == ["blend_byol_step"] * 4 + ["byol_step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_weights_identical"]
