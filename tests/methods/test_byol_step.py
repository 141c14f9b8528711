"""BYOL's mechanics in the trainer's own step: the target follows the online network by the momentum
(not the other way round), gradients reach the online branch, and the loss needs the target network.

The end-to-end learning test cannot see a BYOL broken in these ways within a CI-sized run (250 BYOL
steps on mnist5k barely move the features either way), so these check the step itself."""
from __future__ import annotations

import torch

from rela.data.interfaces import TrainBatch
from rela.methods.byol import Byol
from rela.methods.learner import Learner, method_phase
from rela.models.backbones import build_backbone
from rela.optim import build_optimizer
from rela.step import make_ema_updater, train_step


def learner_and_batch(seed: int = 0) -> tuple[Learner, TrainBatch]:
    torch.manual_seed(seed)
    backbone = build_backbone("small_resnet", seed=seed)
    learner = Learner(Byol(backbone, 32, 16), None, 10)
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    return learner, TrainBatch(*views, torch.arange(8), torch.arange(8) % 10, views="byol")


def test_the_target_follows_the_online_network_by_its_momentum():
    learner, batch = learner_and_batch()
    ema = make_ema_updater(learner, fused=False)
    optimizer = build_optimizer(learner.named_parameters(), "adamw", 1e-2, 0.0)
    target, online = learner.method.teacher_pair()
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    online_before = {n: p.detach().clone() for n, p in online.named_parameters()}
    train_step(learner, optimizer, ema, [batch], phase=method_phase("byol"), bank=None, lr=1e-2, momentum=0.9,
               autocast_dtype=None, fused=False)
    moved = 0
    for (name, t), (_, o) in zip(target.named_parameters(), online.named_parameters()):
        torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * o, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(o, online_before[name])
    assert moved > 0  # the optimiser moved the online network; the target moved a tenth of the way


def test_gradients_reach_the_online_branch_and_the_loss_needs_the_target_network():
    learner, batch = learner_and_batch()
    nets = learner.method
    loss, _ = nets(batch.view1, batch.view2, fused=False)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.backbone.parameters() if p.dim() > 1)
    assert all(p.grad is None for p in nets.target_backbone.parameters())
    with torch.no_grad():
        for p in nets.target_projector.parameters():
            p.add_(torch.randn_like(p))
    perturbed, _ = nets(batch.view1, batch.view2, fused=False)
    assert abs(perturbed.item() - loss.item()) > 1e-3  # the regression target is the target network's
