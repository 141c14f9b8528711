"""Each method's loss against a float64 transcription of its paper's formula, written out here element by
element (loops over rows and pairs, not the module's vectorised code), with the symmetric and temperature
details of each paper."""
from __future__ import annotations

import math

import pytest
import torch

from rela.methods.barlowtwins import barlow_twins_loss
from rela.methods.mocov3 import moco_contrastive_loss
from rela.methods.simclr import nt_xent_loss
from rela.methods.simsiam import simsiam_loss
from rela.methods.vicreg import vicreg_loss


def rows(n: int, d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def nt_xent_transcribed(z1, z2, t):
    """SimCLR eq. 1: l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t) over the 2N augmented
    samples; the loss averages l(2k-1, 2k) + l(2k, 2k-1) over k (here: rows of z1 and z2)."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(cos(z[i], z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(cos(z[i], z[j]) / t) / denominator)
    return total / (2 * n)


def moco_transcribed(q, k, t):
    """MoCo v3 algorithm 1: ctr(q, k) = CrossEntropyLoss(q k^T / t, labels = arange) * 2t, on l2-normalised
    q and k."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        logits = [cos(q[i], k[j]) / t for j in range(n)]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / n * 2 * t


def barlow_transcribed(z1, z2, lam):
    """Barlow Twins eq. 1-2: C_ij = sum_b z1_bi z2_bj / (sqrt(sum_b z1_bi^2) sqrt(sum_b z2_bj^2)) on
    mean-centred outputs; L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2."""
    a, b = z1 - z1.mean(0), z2 - z2.mean(0)
    d = a.shape[1]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = float(a[:, i] @ b[:, j] / (a[:, i].norm() * b[:, j].norm()))
            loss += (1 - c) ** 2 if i == j else lam * c ** 2
    return loss


def vicreg_transcribed(z1, z2, lam, mu, nu, eps=1e-4):
    """VICReg eq. 1-6: s = mean_b ||z1_b - z2_b||^2 / d... as the official code's F.mse_loss (mean over all
    elements); v(Z) = 1/d sum_j max(0, 1 - sqrt(Var(z_j) + eps)); c(Z) = 1/d sum_{i != j} C(Z)_ij^2,
    C(Z) = 1/(n-1) sum_b (z_b - mean)(z_b - mean)^T; L = lam s + mu (v(Z1) + v(Z2)) / 2 + nu (c(Z1) + c(Z2)):
    the variance term halved as the official code (main_vicreg.py) halves it, which the paper's formula does not."""
    n, d = z1.shape
    s = float(((z1 - z2) ** 2).sum()) / (n * d)

    def v(z):
        return sum(max(0.0, 1 - math.sqrt(float(z[:, j].var(unbiased=True)) + eps)) for j in range(d)) / d

    def c(z):
        centred = z - z.mean(0)
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    total += (float(centred[:, i] @ centred[:, j]) / (n - 1)) ** 2
        return total / d

    return lam * s + mu * (v(z1) + v(z2)) / 2 + nu * (c(z1) + c(z2))


def simsiam_transcribed(p1, p2, z1, z2):
    """SimSiam eq. 2: L = D(p1, z2) / 2 + D(p2, z1) / 2, D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    n = p1.shape[0]
    return sum(-cos(p1[i], z2[i]) / 2 - cos(p2[i], z1[i]) / 2 for i in range(n)) / n


@pytest.mark.parametrize("n, d, t", [(2, 3, 0.1), (5, 7, 0.2), (8, 16, 0.5)])
def test_nt_xent_matches_simclr_equation(n, d, t):
    z1, z2 = rows(n, d, 0), rows(n, d, 1)
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(nt_xent_transcribed(z1, z2, t), rel=1e-5)


@pytest.mark.parametrize("n, d, t", [(2, 3, 0.2), (6, 9, 0.2), (8, 16, 1.0)])
def test_moco_contrastive_loss_matches_algorithm_1(n, d, t):
    q, k = rows(n, d, 2), rows(n, d, 3)
    assert moco_contrastive_loss(q, k, t).item() == pytest.approx(moco_transcribed(q, k, t), rel=1e-5)


@pytest.mark.parametrize("n, d", [(4, 3), (9, 8), (16, 5)])
def test_barlow_twins_loss_matches_the_cross_correlation_formula(n, d):
    z1, z2 = rows(n, d, 4, scale=3.0), rows(n, d, 5) + rows(n, d, 4)  # correlated views
    expected = barlow_transcribed(z1, z2, 0.0051)
    assert barlow_twins_loss(z1, z2, 0.0051, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    # With the BatchNorm's eps (the default) the difference is of the order of eps / Var
    assert barlow_twins_loss(z1, z2, 0.0051).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("n, d", [(2, 3), (9, 8), (16, 5)])
def test_vicreg_loss_matches_the_paper_terms(n, d):
    z1, z2 = rows(n, d, 6, scale=0.5), rows(n, d, 7, scale=2.0)  # some dimensions under the variance hinge
    got = vicreg_loss(z1, z2, 25.0, 25.0, 1.0).item()
    assert got == pytest.approx(vicreg_transcribed(z1, z2, 25.0, 25.0, 1.0), rel=1e-6)
    # each weight reaches its own term
    assert vicreg_loss(z1, z2, 0.0, 25.0, 1.0).item() == pytest.approx(vicreg_transcribed(z1, z2, 0, 25, 1), rel=1e-6)
    assert vicreg_loss(z1, z2, 25.0, 0.0, 0.0).item() == pytest.approx(vicreg_transcribed(z1, z2, 25, 0, 0), rel=1e-6)


@pytest.mark.parametrize("n, d", [(1, 4), (7, 33)])
def test_simsiam_loss_matches_the_symmetric_negative_cosine(n, d):
    p1, p2, z1, z2 = (rows(n, d, s) for s in range(8, 12))
    p1.requires_grad_(True)
    z2.requires_grad_(True)
    loss = simsiam_loss(p1, p2, z1, z2, fused=False)
    assert loss.item() == pytest.approx(simsiam_transcribed(p1.detach(), p2, z1, z2.detach()), rel=1e-7)
    loss.backward()
    assert z2.grad is None or not z2.grad.any()  # the stop-gradient
    assert p1.grad.abs().sum() > 0


def test_the_contrastive_losses_are_lowest_when_the_views_agree():
    """Temperature and sign details: identical views (and keys) give a lower loss than unrelated ones."""
    z = rows(8, 16, 12)
    assert nt_xent_loss(z, z, 0.2) < nt_xent_loss(z, rows(8, 16, 13), 0.2)
    assert moco_contrastive_loss(z, z, 0.2) < moco_contrastive_loss(z, rows(8, 16, 13), 0.2)
    assert barlow_twins_loss(z, z, 0.0051) < barlow_twins_loss(z, rows(8, 16, 13), 0.0051)
