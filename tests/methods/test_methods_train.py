"""Every --method in the trainer: one step with the fused ops on (Triton's interpreter on the CPU) and off;
DINO's own state (centre, teacher temperature); the CLI end to end through the RELA phase and the
hand-over, stopped after it and resumed to the uninterrupted run's exact weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from builders import FAST_ARGS, assert_same_backbones, expected_step_fn, training_rows
from rela.config import METHOD_NAMES
from rela.data.interfaces import TrainBatch
from rela.methods.learner import Learner, method_phase
from rela.methods.registry import METHODS, build_method
from rela.models.backbones import build_backbone
from rela.optim import build_optimizer
from rela.options import parse_config
from rela.step import make_ema_updater, train_step
from rela.train import main

SMALL = ["--proj-hidden", "32", "--proj-dim", "16", "--dino-out-dim", "64"]


def learner_for(method: str, seed: int = 0, *flags: str) -> Learner:
    torch.manual_seed(seed)
    cfg = parse_config(["--dataset", "digits", "--method", method, *SMALL, *flags])
    backbone = build_backbone("small_resnet", seed=seed)
    return Learner(build_method(cfg, backbone, num_classes=10), None, 10)


def batch(seed: int = 0, n: int = 8) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]
    return TrainBatch(*views, torch.arange(n), torch.arange(n) % 10, views="test")


def one_step(method: str, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    learner = learner_for(method)
    ema = make_ema_updater(learner, fused=fused)
    # SGD: an update linear in the gradient (Adam's first step is about lr * sign(g), which turns float
    # rounding in a near-zero gradient into a full step either way)
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    loss, *_ = train_step(learner, optimizer, ema, [batch()], phase=method_phase(method), bank=None, lr=1e-2,
                            momentum=0.9, autocast_dtype=None, fused=fused)
    return loss.item(), {k: v.detach().clone() for k, v in learner.state_dict().items()}


def test_the_registry_is_the_option_list():
    assert tuple(METHODS) == METHOD_NAMES
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_step_with_fused_ops_on_matches_off(method):
    """The same step with the Triton kernels (the EMA for teacher methods, BYOL's and SimSiam's cosine loss,
    DINO's loss) and with the references: the same loss and the same weights after it."""
    loss_off, state_off = one_step(method, fused=False)
    loss_on, state_on = one_step(method, fused=True)
    assert torch.isfinite(torch.tensor(loss_off))
    assert loss_on == pytest.approx(loss_off, rel=1e-4, abs=1e-5)
    assert state_on.keys() == state_off.keys()
    for name in state_off:
        torch.testing.assert_close(state_on[name], state_off[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_step_moves_the_student_and_only_teacher_methods_keep_a_teacher(method):
    learner = learner_for(method)
    before = {k: v.detach().clone() for k, v in learner.method.backbone.state_dict().items()}
    ema = make_ema_updater(learner, fused=False)
    optimizer = build_optimizer(learner.named_parameters(), "adamw", 1e-2, 0.0)
    train_step(learner, optimizer, ema, [batch()], phase=method_phase(method), bank=None, lr=1e-2, momentum=0.9,
               autocast_dtype=None, fused=False)
    assert any(not torch.equal(v, before[k]) for k, v in learner.method.backbone.state_dict().items())
    has_teacher = learner.method.teacher_pair() is not None
    assert has_teacher == (method in ("byol", "dino", "mocov3"))
    if has_teacher:  # nothing trains the teacher but the EMA
        teacher, _ = learner.method.teacher_pair()
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not set(map(id, teacher.parameters())) & {id(p) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["byol", "dino", "mocov3"])
def test_teacher_methods_share_one_teacher_plumbing(method):
    """teacher_modules drives the EMA pair, the backbones --compile compiles and the teacher's forward: the
    teacher's backbone then its head, without gradient, in the student's train/eval mode."""
    m = learner_for(method).method
    (teacher_backbone, student_backbone), (teacher_head, student_head) = (
        (getattr(m, t), getattr(m, s)) for t, s in m.teacher_modules)
    assert student_backbone is m.backbone and m.backbones() == [m.backbone, teacher_backbone]
    teacher, student = m.teacher_pair()
    assert list(teacher) == [teacher_backbone, teacher_head] and list(student) == [student_backbone, student_head]
    x = batch().view1
    for training in (True, False):
        m.train(training)
        teacher_backbone.train(not training)  # teacher_forward puts it back in the student's mode
        out = m.teacher_forward(x)
        assert not out.requires_grad and teacher_backbone.training == training
        with torch.no_grad():
            torch.testing.assert_close(out, teacher_head(teacher_backbone(x)))


def test_dino_centre_follows_the_teacher_mean_and_the_temperature_warms_up():
    learner = learner_for("dino", 0, "--dino-teacher-temp", "0.07")  # digits: 0.04 throughout; a warm-up here
    dino = learner.method
    assert dino.center.abs().sum() == 0
    x = batch()
    dino.train()
    dino(x.view1, x.view2, fused=False)
    assert dino.center.abs().sum() == 0  # the centre moves once per optimiser step, after it
    dino.after_step()
    with torch.no_grad():
        both = torch.cat([x.view1, x.view2])
        teacher_mean = dino.teacher_head(dino.teacher_backbone(both)).mean(0)
    torch.testing.assert_close(dino.center, 0.1 * teacher_mean, rtol=1e-5, atol=1e-7)
    assert "method.center" in learner.state_dict()  # saved with the learner in every checkpoint
    # main_dino.py's schedule, per epoch: the digits preset's 2-epoch warm-up is linspace(0.04, 0.07, 2)
    dino.schedule(0, steps_per_epoch=10)
    assert dino.teacher_temp == pytest.approx(0.04)
    dino.schedule(9, steps_per_epoch=10)
    assert dino.teacher_temp == pytest.approx(0.04)
    dino.schedule(10, steps_per_epoch=10)
    assert dino.teacher_temp == pytest.approx(0.07)
    dino.schedule(100, steps_per_epoch=10)
    assert dino.teacher_temp == pytest.approx(0.07)
    dino.eval()
    centre = dino.center.clone()
    dino(x.view1, x.view2, fused=False)  # evaluation leaves the centre alone
    assert torch.equal(dino.center, centre)


# 2 epochs of 8 steps; the RELA phase ends at step 5, and the run stops at step 9, after the hand-over.
RUN = [*FAST_ARGS, *SMALL, "--epochs", "2", "--budget", "0.1", "--prior", "rand", "--rela-phase", "0.3",
       "--deterministic", "--ckpt-every", "3", "--log-every", "3", "--no-monitor"]


def run_split(method: str, tmp_path, name: str = "split") -> dict:
    """Stopped at step 9, after the hand-over at step 5, then resumed to the end; its summary."""
    args = [*RUN, "--method", method, "--bank-dir", str(tmp_path / "banks"), "--out", str(tmp_path / name)]
    assert main([*args, "--stop-after-steps", "9"]) == 0
    assert not (tmp_path / name / "summary.json").exists()
    assert main([*args, "--resume", "auto"]) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_trains_from_the_cli_hands_over_and_resumes_to_the_uninterrupted_run(method, tmp_path):
    """Stopped after the hand-over and resumed, every method ends with the uninterrupted run's exact weights
    and accuracies: whatever state a method keeps (DINO's centre, a teacher, its temperature schedule) is in
    its checkpoint."""
    split = run_split(method, tmp_path)
    assert split["rela_phase_end_step"] == 5 and split["train_steps"] == 16
    rows = training_rows(tmp_path / "split")
    # the default linear hand-over with its teacher reset: steps 6-7 blended (a tenth of 16), rows every 3 steps
    assert [r["step_fn"] for r in rows] == [expected_step_fn(r["step"], 5, 16, method) for r in rows]
    assert f"blend_{method}_step" in [r["step_fn"] for r in rows]
    assert [r["views"] for r in rows] == ["rela"] + [method] * (len(rows) - 1)
    assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
    args = [*RUN, "--method", method, "--bank-dir", str(tmp_path / "banks"), "--out", str(tmp_path / "whole")]
    assert main(args) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert_same_backbones(tmp_path / "whole", tmp_path / "split")
    for key in ("linear_probe_top1", "knn_top1", "images_seen", "rela_phase_end_step", "train_steps"):
        assert split[key] == whole[key], key
    assert [r["loss"] for r in training_rows(tmp_path / "whole")] == [r["loss"] for r in rows]
