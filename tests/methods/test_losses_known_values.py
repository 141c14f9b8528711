"""BYOL and RELA loss values on inputs whose answer is known by hand, through the trainer's own steps."""
import math

import torch

from rela.ops import byol_loss, rela_loss


def test_byol_loss_known_values():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert byol_loss(e1, e1, e1, e1, fused=False).item() == 0.0          # aligned: 2 - 2 cos = 0
    assert byol_loss(e1, e1, e2, e2, fused=False).item() == 2.0          # orthogonal: 2
    assert byol_loss(e1, e1, -e1, -e1, fused=False).item() == 4.0        # opposite: 4
    p = torch.tensor([[3.0, 4.0]])  # cos with e1 = 0.6, with e2 = 0.8
    loss = byol_loss(p, p, e2, e1, fused=False).item()                   # pairs (p1, z2=e1), (p2, z1=e2)
    assert math.isclose(loss, 0.5 * (2 - 1.2) + 0.5 * (2 - 1.6), rel_tol=1e-6)


def test_rela_loss_known_values():
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert rela_loss(y * 3, y, fused=False).item() == 0.0                # scale does not matter
    y_hat = torch.tensor([[0.0, 1.0], [1.0, 1.0]])                       # cos 0 and 1/sqrt(2)
    assert math.isclose(rela_loss(y_hat, y, fused=False).item(), (1 + (1 - 2 ** -0.5)) / 2, rel_tol=1e-6)
