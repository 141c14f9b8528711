"""The SSL methods' numerics against their official code, each transcribed here element by element (plain
Python loops over rows and dimensions, float64), with the official file named: the losses in float32, the
losses under bf16 autocast, the sums over ranks (two gloo ranks on halves of a batch against one process on
all of it), DINO's centre under --grad-accum and its teacher temperature schedule, and batches of one image.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from builders import FAST_ARGS
from rela.data.interfaces import TrainBatch
from rela.methods.barlowtwins import barlow_twins_loss
from rela.methods.dino import Dino, teacher_temperature
from rela.methods.learner import Learner, method_phase
from rela.methods.mocov3 import moco_contrastive_loss
from rela.methods.registry import build_method
from rela.methods.simclr import nt_xent_loss
from rela.methods.vicreg import vicreg_loss
from rela.models.backbones import build_backbone
from rela.options import parse_config
from rela.step import make_ema_updater, train_step
from rela.train import main

LAMBDA, VICREG_WEIGHTS, TEMPERATURE = 0.0051, (25.0, 25.0, 1.0), 0.2


def rows(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale


def as_lists(z: torch.Tensor) -> list[list[float]]:
    return z.double().tolist()


def l2_normalised(z: list[list[float]]) -> list[list[float]]:
    out = []
    for row in z:
        norm = math.sqrt(sum(x * x for x in row))
        out.append([x / max(norm, 1e-12) for x in row])  # F.normalize / tf.math.l2_normalize
    return out


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def cross_entropy(logits: list[float], label: int) -> float:
    top = max(logits)
    return -(logits[label] - top - math.log(sum(math.exp(x - top) for x in logits)))


# --- transcriptions of the official code ---------------------------------------------------------------------

def simclr_official(z1, z2, temperature):
    """google-research/simclr tf2/objective.py add_contrastive_loss, one replica: h = l2_normalize(hidden);
    logits_aa = h1 h1^T / T - masks * LARGE_NUM, logits_bb likewise, logits_ab = h1 h2^T / T, logits_ba =
    h2 h1^T / T; loss_a = softmax_cross_entropy(labels, [logits_ab, logits_aa]) (mean over the batch),
    loss_b = softmax_cross_entropy(labels, [logits_ba, logits_bb]); loss = loss_a + loss_b."""
    large_num = 1e9
    h1, h2 = l2_normalised(as_lists(z1)), l2_normalised(as_lists(z2))
    n = len(h1)
    loss_a = loss_b = 0.0
    for i in range(n):
        ab = [dot(h1[i], h2[j]) / temperature for j in range(n)]
        aa = [dot(h1[i], h1[j]) / temperature - (large_num if j == i else 0.0) for j in range(n)]
        ba = [dot(h2[i], h1[j]) / temperature for j in range(n)]
        bb = [dot(h2[i], h2[j]) / temperature - (large_num if j == i else 0.0) for j in range(n)]
        loss_a += cross_entropy(ab + aa, i) / n
        loss_b += cross_entropy(ba + bb, i) / n
    return loss_a + loss_b


def moco_v3_official(q, k, temperature):
    """facebookresearch/moco-v3 moco/builder.py MoCo.contrastive_loss, one rank: q, k = normalize(q), normalize(k);
    logits = einsum('nc,mc->nm', q, k) / T; labels = arange(N) + N * rank; CrossEntropyLoss()(logits, labels)
    * (2 * T)."""
    q, k = l2_normalised(as_lists(q)), l2_normalised(as_lists(k))
    n = len(q)
    loss = sum(cross_entropy([dot(q[i], k[j]) / temperature for j in range(n)], i) for i in range(n)) / n
    return loss * (2 * temperature)


def batch_norm_no_affine(z: list[list[float]], eps: float = 1e-5) -> list[list[float]]:
    """nn.BatchNorm1d(D, affine=False) in training mode: per dimension, the batch mean and biased variance."""
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for j in range(d):
        mean = sum(z[b][j] for b in range(n)) / n
        var = sum((z[b][j] - mean) ** 2 for b in range(n)) / n
        for b in range(n):
            out[b][j] = (z[b][j] - mean) / math.sqrt(var + eps)
    return out


def barlow_official(z1, z2, lambd):
    """facebookresearch/barlowtwins main.py BarlowTwins.forward: c = bn(z1).T @ bn(z2) / batch_size (summed
    over GPUs by all_reduce; bn a BatchNorm1d(affine=False), synchronised over GPUs); on_diag = sum (c_ii -
    1)^2; off_diag = sum_{i != j} c_ij^2; loss = on_diag + lambd * off_diag."""
    a, b = batch_norm_no_affine(as_lists(z1)), batch_norm_no_affine(as_lists(z2))
    n, d = len(a), len(a[0])
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[r][i] * b[r][j] for r in range(n)) / n
            loss += (c - 1) ** 2 if i == j else lambd * c ** 2
    return loss


def vicreg_official(x, y, sim_coeff, std_coeff, cov_coeff):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward: repr_loss = mse_loss(x, y); x, y centred;
    std = sqrt(var(dim=0) + 0.0001) (unbiased); std_loss = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2;
    cov = x^T x / (batch_size - 1); cov_loss = off_diagonal(cov_x)^2.sum() / num_features + the same for y."""
    x, y = as_lists(x), as_lists(y)
    n, d = len(x), len(x[0])
    repr_loss = sum((x[b][j] - y[b][j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def centred(z):
        means = [sum(z[b][j] for b in range(n)) / n for j in range(d)]
        return [[z[b][j] - means[j] for j in range(d)] for b in range(n)]

    def std_term(z):
        return sum(max(0.0, 1 - math.sqrt(sum(z[b][j] ** 2 for b in range(n)) / (n - 1) + 0.0001))
                   for j in range(d)) / d

    def cov_term(z):
        return sum((sum(z[b][i] * z[b][j] for b in range(n)) / (n - 1)) ** 2
                   for i in range(d) for j in range(d) if i != j) / d

    x, y = centred(x), centred(y)
    std_loss = std_term(x) / 2 + std_term(y) / 2
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * (cov_term(x) + cov_term(y))


def dino_center_official(center, teacher_output, center_momentum):
    """facebookresearch/dino main_dino.py DINOLoss.update_center, once per iteration: batch_center =
    sum(teacher_output, dim=0) / (len(teacher_output) * world_size) (all-reduced); center = center * m +
    batch_center * (1 - m). teacher_output: both global crops' teacher logits, (2B, K)."""
    t = as_lists(teacher_output)
    k = len(t[0])
    return [center[j] * center_momentum + sum(row[j] for row in t) / len(t) * (1 - center_momentum) for j in range(k)]


def dino_teacher_temp_official(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """facebookresearch/dino main_dino.py DINOLoss.__init__: teacher_temp_schedule, indexed by the epoch."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                           np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


# --- the losses in float32 against the official code ------------------------------------------------------------

@pytest.mark.parametrize("n, d", [(2, 3), (7, 16), (12, 9)])
def test_simclr_is_half_the_official_loss_a_plus_loss_b(n, d):
    """The official TF code adds the two directions' means; the paper (eq. 1), lightly and solo-learn average
    over all 2N views, as rela does: half the official number, the same gradient direction."""
    z1, z2 = rows(n, d, 0), rows(n, d, 1) + 0.5 * rows(n, d, 0)
    assert nt_xent_loss(z1, z2, TEMPERATURE).item() == pytest.approx(simclr_official(z1, z2, TEMPERATURE) / 2, rel=1e-6)


@pytest.mark.parametrize("n, d, t", [(2, 3, 0.2), (7, 16, 0.2), (12, 9, 1.0)])
def test_moco_v3_matches_the_official_contrastive_loss(n, d, t):
    q, k = rows(n, d, 2), rows(n, d, 3) + 0.3 * rows(n, d, 2)  # a loss of order 1: no cancellation to amplify
    assert moco_contrastive_loss(q, k, t).item() == pytest.approx(moco_v3_official(q, k, t), rel=1e-6)


@pytest.mark.parametrize("n, d", [(2, 3), (7, 16), (12, 9)])
def test_barlow_twins_matches_the_official_loss(n, d):
    z1, z2 = rows(n, d, 4, scale=3.0), rows(n, d, 5) + rows(n, d, 4)
    assert barlow_twins_loss(z1, z2, LAMBDA).item() == pytest.approx(barlow_official(z1, z2, LAMBDA), rel=1e-6)


@pytest.mark.parametrize("n, d", [(2, 3), (7, 16), (12, 9)])
def test_vicreg_matches_the_official_loss(n, d):
    z1, z2 = rows(n, d, 6, scale=0.5), rows(n, d, 7, scale=2.0)  # some dimensions under the variance hinge
    assert vicreg_loss(z1, z2, *VICREG_WEIGHTS).item() == pytest.approx(vicreg_official(z1, z2, *VICREG_WEIGHTS),
                                                                         rel=1e-6)
    # the variance term alone: the official code's halving
    assert vicreg_loss(z1, z2, 0.0, 1.0, 0.0).item() == pytest.approx(vicreg_official(z1, z2, 0.0, 1.0, 0.0), rel=1e-6)


# --- under the step's bf16 autocast -------------------------------------------------------------------------

LOSSES = {
    "simclr": lambda a, b: nt_xent_loss(a, b, TEMPERATURE),
    "mocov3": lambda a, b: moco_contrastive_loss(a, b, TEMPERATURE),
    "barlowtwins": lambda a, b: barlow_twins_loss(a, b, LAMBDA),
    "vicreg": lambda a, b: vicreg_loss(a, b, *VICREG_WEIGHTS),
}


def loss_and_gradient(name: str, z1: torch.Tensor, z2: torch.Tensor, autocast: bool):
    z1, z2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = LOSSES[name](z1, z2)
    loss.backward()
    return loss.detach(), z1.grad


@pytest.mark.parametrize("name", LOSSES)
def test_losses_under_bf16_autocast_are_the_float32_losses(name):
    """The trainer calls the losses under torch.autocast(bf16), where a matmul casts float32 inputs to bf16
    (percent-level errors in the loss and its gradient); they must run in float32 there."""
    z1, z2 = rows(32, 64, 8), rows(32, 64, 9) + rows(32, 64, 8)
    loss, grad = loss_and_gradient(name, z1, z2, autocast=False)
    loss_bf16, grad_bf16 = loss_and_gradient(name, z1, z2, autocast=True)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_bf16, grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())


# --- one image ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_a_batch_of_one_image_is_refused_by_the_loss(name):
    """One image: VICReg's variance is NaN, Barlow Twins' standardised rows are zeros, the contrastive losses
    have no negative; each would train on nothing, silently."""
    with pytest.raises(ValueError, match="at least 2 images"):
        LOSSES[name](rows(1, 8, 10), rows(1, 8, 11))


@pytest.mark.parametrize("method", ["vicreg", "barlowtwins"])
def test_a_run_with_one_image_per_step_is_refused_with_a_one_line_error(method, tmp_path, capsys):
    code = main([*FAST_ARGS, "--method", method, "--batch-size", "1", "--prior", "none", "--out", str(tmp_path / "run"),
                 "--bank-dir", str(tmp_path / "banks")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--batch-size" in err[0], err


# --- DINO: the centre once per optimiser step, the teacher temperature per epoch ----------------------------------

def dino_learner(seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    cfg = parse_config(["--dataset", "digits", "--method", "dino", "--proj-hidden", "32", "--proj-dim", "16",
                        "--dino-out-dim", "64"])
    return Learner(build_method(cfg, build_backbone("small_resnet", seed=seed)), None, 10)


def micro_batch(seed: int, n: int = 4) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]
    return TrainBatch(*views, torch.arange(n), torch.arange(n) % 10, views="test")


def test_dino_centre_moves_once_per_step_by_the_whole_steps_teacher_mean_under_grad_accum():
    learner = dino_learner()
    dino = learner.method
    ema = make_ema_updater(learner, fused=False)
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    center = [0.0] * dino.center.numel()
    for step in range(2):
        batches = [micro_batch(10 * step), micro_batch(10 * step + 1)]
        with torch.no_grad():  # the teacher as the step's forwards see it (before the step's EMA), per micro-batch
            dino.train()
            teacher_output = torch.cat([dino.teacher_forward(torch.cat([b.view1, b.view2])) for b in batches])
        center = dino_center_official(center, teacher_output, dino.center_momentum)
        train_step(learner, optimizer, ema, batches, phase=method_phase("dino"), bank=None, lr=0.1, momentum=0.99,
                   autocast_dtype=None, fused=False)
        torch.testing.assert_close(dino.center, torch.tensor(center, dtype=torch.float32), rtol=1e-5, atol=1e-7)
    assert "method.center" in learner.state_dict()  # saved with the learner in every checkpoint
    before = dino.center.clone()
    dino(micro_batch(99).view1, micro_batch(99).view2, fused=False)
    assert torch.equal(dino.center, before)  # a forward alone leaves it: the step's end moves it


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2, 5, 10])
def test_dino_teacher_temperature_follows_the_official_schedule_epoch_by_epoch(warmup_epochs):
    nepochs, steps_per_epoch = 14, 7
    official = dino_teacher_temp_official(0.04, 0.07, warmup_epochs, nepochs)
    dino = Dino(Tiny(), 8, 4, 16, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                warmup_teacher_epochs=float(warmup_epochs), center_momentum=0.9)
    assert dino.teacher_temp == pytest.approx(official[0], abs=1e-12)  # before the first schedule call
    for step in range(nepochs * steps_per_epoch):
        dino.schedule(step, steps_per_epoch)
        assert dino.teacher_temp == pytest.approx(official[step // steps_per_epoch], abs=1e-12), step


def test_a_fractional_teacher_warm_up_lies_between_the_whole_ones():
    for epoch in range(12):
        temps = [teacher_temperature(epoch, 0.04, 0.07, w) for w in (0.5, 1.0, 2.0, 2.5, 3.0, 9.5, 10.0)]
        assert all(a >= b for a, b in zip(temps, temps[1:])), (epoch, temps)  # a longer warm-up is never warmer
        assert all(0.04 <= t <= 0.07 for t in temps)
    assert teacher_temperature(1, 0.04, 0.07, 2.5) == pytest.approx(0.04 + 0.03 / 1.5)
    assert [teacher_temperature(e, 0.04, 0.07, 0.5) for e in (0, 1)] == [0.04, 0.07]


# --- two gloo ranks on halves of a batch against one process on all of it --------------------------------------------

class Tiny(nn.Module):
    """A backbone without BatchNorm, so that a row's output does not depend on the rest of its batch."""
    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 6)

    def forward(self, x):
        return self.linear(x)


def tiny_dino() -> Dino:
    torch.manual_seed(0)
    return Dino(Tiny(), 8, 4, 16, student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.07,
                warmup_teacher_epochs=0.0, center_momentum=0.9)


GLOBAL_BATCH, WIDTH = 8, 6


def everything(world: int, rank: int) -> dict[str, torch.Tensor]:
    """Each loss on this rank's share of one batch, its gradient, and DINO's centre after one step."""
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    z1, z2 = rows(GLOBAL_BATCH, WIDTH, 20, scale=2.0), rows(GLOBAL_BATCH, WIDTH, 21) + rows(GLOBAL_BATCH, WIDTH, 20)
    out = {}
    for name in LOSSES:
        loss, grad = loss_and_gradient(name, z1[share], z2[share], autocast=False)
        out[name], out[name + "_grad"] = loss, grad
    dino = tiny_dino().train()
    x1, x2 = rows(GLOBAL_BATCH, 5, 22), rows(GLOBAL_BATCH, 5, 23)
    dino(x1[share], x2[share], fused=False)
    dino.after_step()
    out["dino_center"] = dino.center.clone()
    return out


def rank_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(everything(2, rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_halves_give_the_one_process_losses_gradients_and_dino_centre(tmp_path: Path):
    """Barlow Twins standardises over the global batch (the official SyncBatchNorm), VICReg and SimCLR gather
    with gradients, MoCo v3 gathers keys, DINO all-reduces the teacher's sum: the mean of the two ranks'
    losses is the one-process loss on the whole batch (Barlow Twins': each rank's), and each rank's gradient,
    after DDP's average over the ranks, is the one-process gradient of its rows."""
    mp.spawn(rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    alone = everything(1, 0)
    half = GLOBAL_BATCH // 2
    for name in LOSSES:
        def named(message: str, name=name) -> str:
            return f"{name}: {message}"
        torch.testing.assert_close((ranks[0][name] + ranks[1][name]) / 2, alone[name], rtol=1e-5, atol=0, msg=named)
        for r in range(2):
            torch.testing.assert_close(ranks[r][name + "_grad"] / 2, alone[name + "_grad"][r * half:(r + 1) * half],
                                       rtol=1e-5, atol=1e-7, msg=named)
    torch.testing.assert_close(ranks[0]["barlowtwins"], alone["barlowtwins"], rtol=1e-5, atol=0)
    torch.testing.assert_close(ranks[1]["barlowtwins"], alone["barlowtwins"], rtol=1e-5, atol=0)
    dino = tiny_dino().train()
    with torch.no_grad():
        teacher_output = dino.teacher_forward(torch.cat([rows(GLOBAL_BATCH, 5, 22), rows(GLOBAL_BATCH, 5, 23)]))
    expected = torch.tensor(dino_center_official([0.0] * 16, teacher_output, 0.9), dtype=torch.float32)
    for r in range(2):
        torch.testing.assert_close(ranks[r]["dino_center"], expected, rtol=1e-5, atol=1e-7)
